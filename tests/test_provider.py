"""claude_cli_provider through the real LiteLLM entry points, driving the fake CLI."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import litellm
import pytest
from litellm import exceptions as lx
from litellm.exceptions import MidStreamFallbackError

import claude_cli_provider as ccp
from daemon.claude import ClaudeEngine, ErrorCode, StartInfo, TurnResult
from tests.test_engine import FAKE, SID, Env
from tests.test_runner import assert_gone, wait_for_file

MODEL = "claude-cli/sonnet"


def user(text: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


class SpyProvider(ccp.ClaudeCLIProvider):
    """Records what LiteLLM hands the provider."""

    def __init__(self, engine: ClaudeEngine) -> None:
        super().__init__(engine)
        self.calls: list[dict[str, Any]] = []

    async def acompletion(self, model: str, messages: list[Any], *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs["optional_params"])
        return await super().acompletion(model, messages, *args, **kwargs)

    async def astreaming(  # type: ignore[override]
        self, model: str, messages: list[Any], *args: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        self.calls.append(kwargs["optional_params"])
        async for chunk in super().astreaming(model, messages, *args, **kwargs):
            yield chunk


@pytest.fixture(name="quiet", scope="module")
def _quiet() -> Iterator[None]:
    names = ("suppress_debug_info", "turn_off_message_logging", "drop_params", "num_retries")
    saved = {name: getattr(litellm, name) for name in names}
    ccp.quiet_litellm()
    yield
    for name, value in saved.items():
        setattr(litellm, name, value)


@pytest.fixture(name="env")
def _env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture(name="provider")
async def _provider(env: Env, quiet: None) -> AsyncIterator[SpyProvider]:
    saved = list(litellm.custom_provider_map)
    provider = SpyProvider(env.engine())
    ccp.register(provider)
    yield provider
    await provider.engine.aclose()
    litellm.custom_provider_map = saved


async def test_acompletion_response(provider: SpyProvider) -> None:
    resp = await litellm.acompletion(
        model=MODEL, messages=user("hello"), claude={"new_session_id": SID}
    )
    turn = resp._hidden_params["claude_turn"]
    assert isinstance(turn, TurnResult)
    assert resp.choices[0].message.content == "echo: hello (turn 1)"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.model == "claude-cli/claude-sonnet-5"
    assert resp._hidden_params["claude_session_id"] == SID
    assert resp._hidden_params["response_cost"] == turn.cost_usd > 0
    usage = turn.usage
    prompt = (
        usage["input_tokens"]
        + usage["cache_read_input_tokens"]
        + usage["cache_creation_input_tokens"]
    )
    assert resp.usage.prompt_tokens == prompt
    assert resp.usage.completion_tokens == usage["output_tokens"]
    fields = resp.choices[0].message.provider_specific_fields
    assert fields["claude_session_id"] == SID
    assert fields["claude_cost_usd"] == turn.cost_usd
    assert fields["claude_result"]["text"] == "echo: hello (turn 1)"
    dumped = resp.model_dump()
    assert dumped["choices"][0]["message"]["provider_specific_fields"]["claude_session_id"] == SID


async def test_on_start_callable_survives_litellm(provider: SpyProvider) -> None:
    starts: list[StartInfo] = []
    hook = starts.append
    resp = await litellm.acompletion(model=MODEL, messages=user("hi"), claude={"on_start": hook})
    assert provider.calls[-1]["claude"]["on_start"] is hook
    stream = await litellm.acompletion(
        model=MODEL, messages=user("hi"), claude={"on_start": hook}, stream=True
    )
    try:
        async for _ in stream:
            pass
    finally:
        await stream.aclose()
    assert provider.calls[-1]["claude"]["on_start"] is hook
    assert [s.mode for s in starts] == ["cold", "cold"]
    assert starts[0].session_id == resp._hidden_params["claude_session_id"]


async def test_resume_sends_only_the_last_user_message(provider: SpyProvider) -> None:
    first = await litellm.acompletion(model=MODEL, messages=user("one"))
    sid = first._hidden_params["claude_session_id"]
    history = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "two"},
    ]
    second = await litellm.acompletion(model=MODEL, messages=history, claude={"session_id": sid})
    assert second.choices[0].message.content == "echo: two (turn 2)"
    assert second._hidden_params["claude_session_id"] == sid


async def test_system_messages_and_content_parts(provider: SpyProvider, env: Env) -> None:
    messages = [
        {"role": "system", "content": "be terse"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    resp = await litellm.acompletion(model=MODEL, messages=messages)
    assert resp.choices[0].message.content == "echo: a\nb (turn 1)"
    argv = env.invocations()[-1]["argv"]
    assert argv[argv.index("--append-system-prompt") + 1] == "be terse"
    await litellm.acompletion(
        model=MODEL, messages=messages, claude={"append_system_prompt": "explicit"}
    )
    argv = env.invocations()[-1]["argv"]
    assert argv[argv.index("--append-system-prompt") + 1] == "explicit"


async def test_default_model_omits_the_flag(provider: SpyProvider, env: Env) -> None:
    resp = await litellm.acompletion(model="claude-cli/default", messages=user("hi"))
    assert "--model" not in env.invocations()[-1]["argv"]
    assert resp.model == "claude-cli/claude-opus-4-8"


async def test_streaming(provider: SpyProvider) -> None:
    stream = await litellm.acompletion(
        model=MODEL, messages=user("stream me"), stream=True, stream_options={"include_usage": True}
    )
    chunks = []
    try:
        async for chunk in stream:
            chunks.append(chunk)
    finally:
        await stream.aclose()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me (turn 1)"
    sids = {getattr(c, "claude_session_id", None) for c in chunks} - {None}
    assert len(sids) == 1
    assert any(getattr(c, "claude_cost_usd", 0) > 0 for c in chunks)
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
    assert any(getattr(c, "usage", None) and c.usage.completion_tokens > 0 for c in chunks)


async def test_streaming_partial_deltas(provider: SpyProvider) -> None:
    stream = await litellm.acompletion(
        model=MODEL,
        messages=user("a longer answer to split in pieces"),
        stream=True,
        claude={"include_partial_messages": True},
    )
    pieces = []
    try:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    finally:
        await stream.aclose()
    assert len(pieces) > 1
    assert "".join(pieces) == "echo: a longer answer to split in pieces (turn 1)"


async def test_stream_aclose_kills_the_cli(provider: SpyProvider, env: Env) -> None:
    pid_file = env.tmp / "pid"
    stream = await litellm.acompletion(
        model=MODEL, messages=user(f"[[pidfile:{pid_file}]] [[pause:5]]"), stream=True
    )
    first = await anext(stream)  # the first text, carrying the session id
    assert first.choices[0].delta.content == "working on it"
    assert getattr(first, "claude_session_id", None)
    pid = int(await wait_for_file(pid_file))
    t0 = time.monotonic()
    await stream.aclose()
    assert time.monotonic() - t0 < 1.5
    await assert_gone(pid)
    assert provider.engine.describe()["running"] == 0


async def test_caller_cancellation_kills_the_cli(provider: SpyProvider, env: Env) -> None:
    pid_file = env.tmp / "pid"
    task = asyncio.create_task(
        litellm.acompletion(model=MODEL, messages=user(f"[[pidfile:{pid_file}]] [[sleep:30]]"))
    )
    pid = int(await wait_for_file(pid_file))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_gone(pid)


@pytest.mark.parametrize(
    ("prompt", "cls", "base", "code", "status"),
    [
        ("[[error:401]]", ccp.ClaudeAuthenticationError, lx.AuthenticationError,
         "AUTH_FAILED", 401),
        ("[[error:429]]", ccp.ClaudeRateLimitError, lx.RateLimitError, "RATE_LIMITED", 429),
        ("[[error:500]]", ccp.ClaudeAPIError, lx.APIError, "API_ERROR", 500),
        ("[[error:529]]", ccp.ClaudeAPIError, lx.APIError, "API_ERROR", 529),
        ("[[error:connect]]", ccp.ClaudeAPIError, lx.APIError, "API_ERROR", 502),
        ("[[max-turns]]", ccp.ClaudeMaxTurnsError, lx.BadRequestError, "MAX_TURNS", 400),
        ("[[crash:2]]", ccp.ClaudeCLICrashError, lx.InternalServerError, "CLI_CRASHED", 500),
        ("[[bad-json]]", ccp.ClaudeCLICrashError, lx.InternalServerError,
         "INVALID_OUTPUT", 500),
    ],
)  # fmt: skip
async def test_errors_are_mapped(
    provider: SpyProvider,
    env: Env,
    capfd: pytest.CaptureFixture[str],
    prompt: str,
    cls: type[Exception],
    base: type[Exception],
    code: str,
    status: int,
) -> None:
    with pytest.raises(cls) as info:
        await litellm.acompletion(model=MODEL, messages=user(prompt))
    assert isinstance(info.value, base)
    err: Any = info.value
    assert err.ksi_code == code
    assert err.claude_error.code == ErrorCode(code)
    assert err.status_code == status
    assert ccp.claude_error_of(err) is err.claude_error
    assert len(env.invocations()) == 1  # never retried
    assert capfd.readouterr().out == ""  # no LiteLLM banners on stdout


async def test_session_not_found(provider: SpyProvider) -> None:
    with pytest.raises(ccp.ClaudeSessionNotFoundError) as info:
        await litellm.acompletion(model=MODEL, messages=user("x"), claude={"session_id": SID})
    assert isinstance(info.value, lx.NotFoundError)
    assert info.value.ksi_code == "SESSION_NOT_FOUND"


async def test_timeout(provider: SpyProvider, env: Env) -> None:
    pid_file = env.tmp / "pid"
    with pytest.raises(ccp.ClaudeTimeoutError) as info:
        await litellm.acompletion(
            model=MODEL,
            messages=user(f"[[pidfile:{pid_file}]] [[sleep:30]]"),
            claude={"timeout_s": 0.5},
        )
    assert isinstance(info.value, lx.Timeout)
    assert info.value.ksi_code == "TIMEOUT"
    await assert_gone(int(pid_file.read_text()))


async def test_missing_cli(env: Env, quiet: None) -> None:
    saved = list(litellm.custom_provider_map)
    ccp.register(ccp.ClaudeCLIProvider(env.engine(claude_bin=str(env.tmp / "nope"))))
    try:
        with pytest.raises(ccp.ClaudeUnavailableError) as info:
            await litellm.acompletion(model=MODEL, messages=user("x"))
    finally:
        litellm.custom_provider_map = saved
    assert isinstance(info.value, lx.ServiceUnavailableError)
    assert info.value.ksi_code == "CLAUDE_NOT_FOUND"
    assert "npm ci" in str(info.value)


async def test_stream_errors(provider: SpyProvider) -> None:
    stream = await litellm.acompletion(model=MODEL, messages=user("[[error:401]]"), stream=True)
    with pytest.raises(ccp.ClaudeAuthenticationError):
        async for _ in stream:
            pass
    await stream.aclose()
    # LiteLLM wraps 429/5xx raised mid-stream in MidStreamFallbackError.
    stream = await litellm.acompletion(model=MODEL, messages=user("[[error:429]]"), stream=True)
    with pytest.raises(MidStreamFallbackError) as info:
        async for _ in stream:
            pass
    await stream.aclose()
    assert ccp.ksi_code_of(info.value) == "RATE_LIMITED"
    found = ccp.claude_error_of(info.value)
    assert found is not None
    assert found.code is ErrorCode.RATE_LIMITED


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"claude": {"session_id": "nope"}}, "not a valid UUID"),
        ({"claude": {"bogus": 1}}, "Extra inputs are not permitted"),
        ({"claude": "not a dict"}, "must be a dict"),
        ({"messages": [{"role": "system", "content": "only system"}]}, "no non-empty user"),
        ({"messages": user([{"type": "image_url", "image_url": {"url": "x"}}])}, "only text"),
    ],
)
async def test_bad_requests(
    provider: SpyProvider, env: Env, kwargs: dict[str, Any], needle: str
) -> None:
    params = {"model": MODEL, "messages": user("hi"), **kwargs}
    with pytest.raises(ccp.ClaudeBadRequestError) as info:
        await litellm.acompletion(**params)
    assert isinstance(info.value, lx.BadRequestError)
    assert info.value.ksi_code == "BAD_REQUEST"
    assert needle in str(info.value)
    assert env.invocations() == []


def test_register_replaces_only_claude_cli(env: Env) -> None:
    saved = list(litellm.custom_provider_map)
    other: Any = {"provider": "other-llm", "custom_handler": object()}
    stale: Any = {"provider": "claude-cli", "custom_handler": object()}
    litellm.custom_provider_map = [other, stale]
    try:
        provider = ccp.register(ccp.ClaudeCLIProvider(env.engine()))
        assert litellm.custom_provider_map == [
            other,
            {"provider": "claude-cli", "custom_handler": provider},
        ]
    finally:
        litellm.custom_provider_map = saved


async def test_warm_up_runs_no_cli(provider: SpyProvider, env: Env) -> None:
    await ccp.warm_up(provider)
    assert len(provider.calls) == 2  # one plain, one streamed call reached the provider
    assert env.invocations() == []


def test_quiet_litellm(quiet: None) -> None:
    assert litellm.suppress_debug_info is True
    assert litellm.num_retries is None
    assert logging.getLogger("LiteLLM").handlers == []


def test_sync_completion_and_streaming(env: Env, quiet: None) -> None:
    saved = list(litellm.custom_provider_map)
    ccp.register(ccp.ClaudeCLIProvider(env.engine()))
    try:
        resp = litellm.completion(model=MODEL, messages=user("sync"))
        assert resp.choices[0].message.content == "echo: sync (turn 1)"
        chunks = list(litellm.completion(model=MODEL, messages=user("sync s"), stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "echo: sync s (turn 1)"
    finally:
        litellm.custom_provider_map = saved


async def test_sync_completion_inside_a_running_loop(provider: SpyProvider) -> None:
    # Blocks this loop on purpose: the provider must run the turn on a private thread.
    resp = litellm.completion(model=MODEL, messages=user("nested"))
    assert resp.choices[0].message.content == "echo: nested (turn 1)"


def test_default_engine_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KSI_CLAUDE_BIN", str(FAKE))
    provider = ccp.ClaudeCLIProvider()
    assert provider.engine.describe()["claude_bin"] == str(FAKE)


def test_an_awaitable_that_litellm_drops_leaves_nothing_behind(env: Env, quiet: None) -> None:
    """litellm.acompletion builds the provider's awaitable in a worker thread and awaits it
    back on the loop; a cancel in between (a SPAWN cancelled as it starts) drops it. Dropped,
    it must not warn "coroutine ... was never awaited" (an error under this suite's warning
    filter, which made cancel tests flaky) and must not have started a turn."""
    provider = ccp.ClaudeCLIProvider(env.engine())
    unraisable: list[Any] = []
    saved_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pending = provider.acompletion(MODEL, user("hi"), optional_params={})
            assert asyncio.iscoroutine(pending)  # what LiteLLM checks before awaiting it
            del pending
            gc.collect()
    finally:
        sys.unraisablehook = saved_hook
    assert [str(w.message) for w in caught] == []
    assert unraisable == []
    assert env.invocations() == []
