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
  subclasses with ``.ksi_code``, ``.claude_error`` and ``headers`` saying
  ``x-should-retry: false``). While streaming, LiteLLM wraps 429/5xx errors in
  ``MidStreamFallbackError``; use :func:`claude_error_of` to get at ours.
* A retried request (a Router's retries, a resend with the same
  ``Idempotency-Key``) gets its first attempt's outcome: one paid turn per
  request (``daemon/claude/replays.py``).
* Streaming yields, in order: text chunks (whole assistant text blocks, or
  deltas with ``include_partial_messages``; the first carries
  ``claude_session_id``); an empty chunk carrying ``claude_session_id``,
  ``claude_cost_usd`` (and ``claude_result`` if the policy exposes internals)
  with the cost also in ``usage.cost``; the ``finish_reason="stop"`` chunk.
  Nothing comes before the first text, so a failing turn fails first.
* Streams must be closed: ``break`` does not stop the provider generator, only
  ``await stream.aclose()`` does (then the CLI's process group is killed).
* Instances: :data:`handler` for in-process use (``register()``),
  :data:`proxy_handler` for a LiteLLM proxy's ``custom_handler`` (an operator
  policy applies, :mod:`daemon.claude.policy`), :data:`proxy_hooks` for its
  ``callbacks``. A proxy health probe runs no turn.
"""

from __future__ import annotations

import os

# Must precede the LiteLLM import: otherwise import blocks on a remote
# cost-map fetch (with retries) and logging goes to stdout at DEBUG.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("LITELLM_LOG", "ERROR")

import asyncio
import contextlib
import logging
import threading
import time
import types
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterator,
    Mapping,
)
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar, cast

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
from litellm.integrations.custom_logger import CustomLogger
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
from daemon.claude.auth import credential_source
from daemon.claude.chat import (
    cli_model,
    event_text,
    prompt_from_messages,
    provider_fields,
    usage_numbers,
)
from daemon.claude.errors import claude_error_of as claude_error_of  # public re-export
from daemon.claude.policy import OPEN, PROXY_DEFAULT, Policy
from daemon.claude.replays import Replays, request_key

PROVIDER = "claude-cli"
_WARMUP_KWARG = "ksi_warmup"
_HEALTH_TAG = "litellm-internal-health-check"  # litellm.constants, 1.106.2
_T = TypeVar("_T")


# -- exceptions ---------------------------------------------------------------


class _ClaudeErrorMixin:
    """Adds ``ksi_code`` (the daemon's :class:`ErrorCode`) and the original error."""

    ksi_code: ErrorCode = ErrorCode.INTERNAL_ERROR
    claude_error: ClaudeCLIError | None = None
    headers: Any  # Timeout and RateLimitError declare it; a proxy sends it with the error


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
    exc.headers = dict(_RETRY_OFF)
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


@contextlib.contextmanager
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


_RETRY_OFF = {"x-should-retry": "false"}
"""On every error: the openai SDK (and others that honour it) then does not resend the HTTP
request, which would run another paid turn."""


def _parse_request(
    messages: list[Any], params: Mapping[str, Any], model: str, policy: Policy
) -> tuple[str, ClaudeOptions]:
    try:
        prompt, system = prompt_from_messages(messages)
        return prompt, policy.options_for(params.get("claude"), system)
    except ValueError as exc:  # includes pydantic.ValidationError and PolicyViolation
        raise _make_error(
            ClaudeBadRequestError, f"invalid request: {exc}", model, ksi_code=ErrorCode.BAD_REQUEST
        ) from exc


def _is_health_probe(kwargs: Mapping[str, Any]) -> bool:
    """The proxy's model health check (``/health``, background checks) tags its calls."""
    params = kwargs.get("litellm_params") or {}
    for name in ("litellm_metadata", "metadata"):
        tags = (params.get(name) or {}).get("tags") or ()
        if _HEALTH_TAG in tags:
            return True
    return False


def build_response(
    turn: TurnResult, requested_model: str, *, internals: bool = True
) -> ModelResponse:
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
                    provider_specific_fields=provider_fields(turn, internals),
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


def _chunk(text: str, fields: dict[str, Any] | None = None) -> GenericStreamingChunk:
    chunk = GenericStreamingChunk(
        text=text, is_finished=False, finish_reason="", usage=None, index=0, tool_use=None
    )
    if fields:
        chunk["provider_specific_fields"] = fields
    return chunk


def _final_chunk(turn: TurnResult, internals: bool) -> GenericStreamingChunk:
    prompt, completion, _, _ = usage_numbers(turn.usage)
    # "cost" is how a streamed response reports its price: LiteLLM assembles the logged
    # response from the chunks and takes usage.cost as the provider's (else: no price).
    usage: Any = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost": turn.cost_usd,
    }
    return GenericStreamingChunk(
        text="",
        is_finished=True,
        finish_reason="stop",
        usage=usage,
        index=0,
        tool_use=None,
        provider_specific_fields=provider_fields(turn, internals),
    )


def _answer(model: str, text: str) -> ModelResponse:
    """A response that ran no turn (warm-up, health probe): free."""
    response = ModelResponse(model=f"{PROVIDER}/{model}")
    response.choices[0].message.content = text
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
    """LiteLLM CustomLLM running Claude Code CLI turns via a ClaudeEngine.

    ``policy``: the operator's limits on ``claude={...}`` (:mod:`daemon.claude.policy`);
    unset, ``$KSI_PROVIDER_POLICY`` if set, else ``default_policy``. The engine (which finds
    the CLI) and the policy are made at the first call, so a proxy config's
    ``environment_variables`` apply to them.
    """

    def __init__(
        self,
        engine: ClaudeEngine | None = None,
        *,
        policy: Policy | None = None,
        default_policy: Policy = OPEN,
    ) -> None:
        super().__init__()
        self._engine = engine
        self._policy = policy
        self._default_policy = default_policy
        self._replays = Replays()

    @property
    def engine(self) -> ClaudeEngine:
        """The engine of the caller's context (``use_engine``), else this provider's own.

        LiteLLM keeps one provider per process (``custom_provider_map``); a process that runs
        several engines (daemons under test, in one process) says which one a call is for.
        """
        current = CURRENT_ENGINE.get()
        if current is not None:
            return current
        if self._engine is None:
            self._engine = ClaudeEngine(
                EngineConfig(
                    claude_bin=os.environ.get("KSI_CLAUDE_BIN") or os.environ.get("CLAUDE_BIN"),
                    project_root=Path(__file__).resolve().parent,
                    default_cwd=Path(os.getcwd()),
                )
            )
        return self._engine

    @property
    def policy(self) -> Policy:
        if self._policy is None:
            self._policy = Policy.from_env(self._default_policy)
        return self._policy

    def _health(self, model: str) -> ModelResponse:
        """The proxy's health probe, answered without a paid turn: is there a CLI, and
        credentials where it looks? (Whether the key is valid only a turn can tell.)"""
        engine = self.engine
        if engine.binary is None:
            raise _make_error(
                ClaudeUnavailableError,
                "no claude CLI found",
                model,
                ksi_code=ErrorCode.CLAUDE_NOT_FOUND,
            )
        if credential_source(engine.cli_env()) is None:
            raise _make_error(
                ClaudeAuthenticationError,
                "the claude CLI has no credentials (Not logged in)",
                model,
                ksi_code=ErrorCode.AUTH_FAILED,
            )
        return _answer(model, "ok")

    async def _turn(
        self, kwargs: Mapping[str, Any], prompt: str, model: str, opts: ClaudeOptions
    ) -> TurnResult:
        """One turn per request key: a retry gets the first attempt's outcome."""
        key = request_key(kwargs)
        future, first = self._replays.claim(key)
        if not first:
            return await Replays.outcome(future)
        try:
            turn = await self.engine.run_turn(prompt, model=cli_model(model), opts=opts)
        except BaseException as exc:
            future.set_exception(_settled(exc))
            raise
        future.set_result(turn)
        return turn

    # LiteLLM 1.106.2 calls this in a worker thread (litellm.acompletion runs `completion`
    # in an executor) and awaits what it returns back on the loop. A cancel that lands
    # while the thread runs (a SPAWN cancelled as it starts) drops that value unawaited,
    # and a native coroutine then warns "never awaited" from the garbage collector. So the
    # turn's coroutine is only created once LiteLLM awaits: see _when_awaited.
    def acompletion(
        self, model: str, messages: list[Any], *args: Any, **kwargs: Any
    ) -> Coroutine[Any, Any, ModelResponse]:
        return _when_awaited(lambda: self._acompletion(model, messages, *args, **kwargs))

    # LiteLLM passes every argument by keyword (main._complete_custom_providers);
    # only ``optional_params`` matters here, where ``claude={...}`` arrives.
    async def _acompletion(
        self, model: str, messages: list[Any], *args: Any, **kwargs: Any
    ) -> ModelResponse:
        params: Mapping[str, Any] = kwargs.get("optional_params") or {}
        if params.get(_WARMUP_KWARG):
            return _answer(model, "warm")
        with _litellm_errors(model):
            if _is_health_probe(kwargs):
                return self._health(model)
            policy = self.policy
            prompt, opts = _parse_request(messages, params, model, policy)
            turn = await self._turn(kwargs, prompt, model, opts)
            return build_response(turn, model, internals=policy.expose_internals)

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
        with _litellm_errors(model):
            policy = self.policy
            prompt, opts = _parse_request(messages, params, model, policy)
            key = request_key(kwargs)
            future, first = self._replays.claim(key)
            if first:
                chunks = self._stream(prompt, model, opts, future, policy.expose_internals)
            else:
                chunks = _replayed(await Replays.outcome(future), policy.expose_internals)
            # aclosing: closing this generator must close the inner one at once (it kills
            # the CLI), not when the garbage collector gets to it.
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield chunk

    async def _stream(
        self,
        prompt: str,
        model: str,
        opts: ClaudeOptions,
        future: Future[TurnResult],
        internals: bool,
    ) -> AsyncGenerator[GenericStreamingChunk]:
        stream = self.engine.stream_turn(prompt, model=cli_model(model), opts=opts)
        # The session id rides on the first text chunk, not on a chunk of its own: the
        # first chunk commits a proxy's HTTP 200, and a 401/429 from the CLI comes before
        # any text, so it must still be able to become the response's status.
        session: dict[str, Any] | None = None
        try:
            async for event in stream:
                if event.get("type") == "system" and event.get("subtype") == "init":
                    session = {"claude_session_id": stream.session_id}
                    continue
                text = event_text(event, opts.include_partial_messages)
                if text:
                    yield _chunk(text, session)
                    session = None
            if stream.result is None:  # the engine raises on failure; defensive only
                raise ClaudeCLIError(ErrorCode.INVALID_OUTPUT, "stream ended without result")
            future.set_result(stream.result)
            yield _final_chunk(stream.result, internals)
        except BaseException as exc:
            if not future.done():
                future.set_exception(_settled(exc))
            raise
        finally:
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


@types.coroutine
def _lazy(make: Callable[[], Coroutine[Any, Any, _T]]) -> Generator[Any, Any, _T]:
    return (yield from make().__await__())


def _when_awaited(make: Callable[[], Coroutine[Any, Any, _T]]) -> Coroutine[Any, Any, _T]:
    """A coroutine (``asyncio.iscoroutine`` says so, as LiteLLM checks) that creates
    ``make()``'s only when awaited. Dropped unawaited, it is an unstarted generator, which
    goes silently, and nothing of the turn ever started."""
    return cast(Coroutine[Any, Any, _T], _lazy(make))


def _settled(exc: BaseException) -> BaseException:
    """What a later attempt of the same request raises: the error itself, or for a turn
    cancelled half-way (its caller gave up; the CLI was stopped) a CANCELLED error, so a
    retry neither re-runs it nor waits forever."""
    if isinstance(exc, Exception):
        return exc
    return ClaudeCLIError(
        ErrorCode.CANCELLED, "the first attempt of this request was cancelled; not re-run"
    )


async def _replayed(turn: TurnResult, internals: bool) -> AsyncGenerator[GenericStreamingChunk]:
    """A finished turn as a stream again (a retried streaming request)."""
    yield _chunk(turn.text, {"claude_session_id": turn.session_id})
    yield _final_chunk(turn, internals)


# -- module-level helpers -----------------------------------------------------


def register(provider: ClaudeCLIProvider | None = None) -> ClaudeCLIProvider:
    """Install ``provider`` as "claude-cli", replacing only a previous "claude-cli" entry.

    LiteLLM uses the *last* entry of a duplicated name, so stale ones are removed.
    """
    provider = provider or handler
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


handler = ClaudeCLIProvider()
"""The provider for in-process LiteLLM use (``register()`` installs it): no limits beyond
``$KSI_PROVIDER_POLICY``."""

proxy_handler = ClaudeCLIProvider(default_policy=PROXY_DEFAULT)
"""The provider for a LiteLLM proxy's ``custom_handler`` (the proxy needs an instance):
``$KSI_PROVIDER_POLICY``, else :data:`~daemon.claude.policy.PROXY_DEFAULT` (no tools, no
client cwd, no CLI internals in responses)."""


class ProxyHooks(CustomLogger):
    """LiteLLM proxy hooks for claude-cli deployments (``litellm_settings.callbacks``).

    A streamed request that fails before its first chunk (a 429 from the CLI, say) reaches
    the proxy wrapped in LiteLLM's ``MidStreamFallbackError``, whose headers are its own: the
    provider's ``x-should-retry: false`` is lost and the openai SDK resends the request,
    which runs the turn again. The proxy's response-headers hook puts it back.
    """

    async def async_post_call_response_headers_hook(
        self,
        data: dict[str, Any],
        user_api_key_dict: Any,
        response: object,
        request_headers: dict[str, str] | None = None,
        litellm_call_info: dict[str, object] | None = None,
    ) -> dict[str, str] | None:
        # On every claude-cli response: a stream's headers are fixed before its first
        # chunk, so before anyone knows whether it fails (a success ignores the header).
        ours = (litellm_call_info or {}).get("custom_llm_provider") == PROVIDER
        return dict(_RETRY_OFF) if ours else None


proxy_hooks = ProxyHooks()
"""For a proxy config: ``litellm_settings: {callbacks: ["claude_cli_provider.proxy_hooks"]}``."""
