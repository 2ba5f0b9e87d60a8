"""The provider as LiteLLM's users meet it: behind a Router (retries), under an operator's
policy, in a logging callback (spend), as a proxy's health probe. Fake CLI throughout; the
real proxy and CLI are in tests/e2e/test_litellm_proxy.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import litellm
import pytest
from litellm.exceptions import APIError, RateLimitError, Timeout
from litellm.integrations.custom_logger import CustomLogger
from litellm.router import Router

import claude_cli_provider as ccp
from daemon.claude.policy import OPEN, PROXY_DEFAULT, Policy, PolicyViolation
from daemon.claude.replays import Replays, request_key
from tests.helpers import NO_CREDENTIALS
from tests.test_engine import Env

MODEL = "claude-cli/sonnet"


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(name="env")
def _env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture(name="install")
async def _install(env: Env) -> AsyncIterator[Callable[..., ccp.ClaudeCLIProvider]]:
    """``install(policy=...)``: a provider on the fake CLI, registered as claude-cli."""
    saved = list(litellm.custom_provider_map)
    ccp.quiet_litellm()
    made: list[ccp.ClaudeCLIProvider] = []

    def install(**kw: Any) -> ccp.ClaudeCLIProvider:
        provider = ccp.ClaudeCLIProvider(env.engine(), **kw)
        ccp.register(provider)
        made.append(provider)
        return provider

    yield install
    for provider in made:
        await provider.engine.aclose()
    litellm.custom_provider_map = saved


def prompts_run(env: Env) -> list[str]:
    """The prompt of every turn the fake CLI ran."""
    return [e["turn_prompt"] for e in env.entries() if "turn_prompt" in e]


def router(**settings: Any) -> Any:  # Router, whose overloads want typed messages
    return Router(
        model_list=[{"model_name": "claude", "litellm_params": {"model": MODEL}}], **settings
    )


# -- 1. a retried request does not re-run its turn ------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 529])
async def test_router_retries_do_not_rerun_a_failed_turn(
    install: Any, env: Env, status: int
) -> None:
    install()
    r = router(num_retries=2, retry_after=0)  # LiteLLM's defaults retry twice
    with pytest.raises(APIError if status != 429 else RateLimitError):
        await r.acompletion(model="claude", messages=user(f"[[error:{status}]] once"))
    assert prompts_run(env) == [f"[[error:{status}]] once"]


async def test_router_retry_after_a_timeout_gets_the_timeout_again(install: Any, env: Env) -> None:
    install()
    r = router(num_retries=2, retry_after=0)
    with pytest.raises(Timeout):
        await r.acompletion(
            model="claude", messages=user("[[sleep:5]] slow"), claude={"timeout_s": 0.5}
        )
    assert prompts_run(env) == ["[[sleep:5]] slow"]


async def test_router_retries_of_a_stream_do_not_rerun_it(install: Any, env: Env) -> None:
    install()
    r = router(num_retries=2, retry_after=0)
    stream = await r.acompletion(
        model="claude", messages=user("[[error:429]] streamed"), stream=True
    )
    with pytest.raises(RateLimitError):
        await anext(stream)
    await stream.aclose()
    assert prompts_run(env) == ["[[error:429]] streamed"]


async def test_an_idempotency_key_answers_a_resend_with_the_first_result(
    install: Any, env: Env
) -> None:
    install()
    request = {"headers": {"Idempotency-Key": "req-1"}}
    first = await litellm.acompletion(
        model=MODEL, messages=user("pay once"), proxy_server_request=request
    )
    again = await litellm.acompletion(
        model=MODEL, messages=user("pay once"), proxy_server_request=request
    )
    assert again.choices[0].message.content == first.choices[0].message.content
    assert prompts_run(env) == ["pay once"]
    # A different key, or none, is a new request.
    await litellm.acompletion(model=MODEL, messages=user("pay once"))
    assert len(prompts_run(env)) == 2


def test_request_keys_are_scoped_by_the_callers_api_key() -> None:
    def kw(owner: str, trace: str = "t1") -> dict[str, Any]:
        return {
            "litellm_params": {
                "litellm_trace_id": trace,
                "metadata": {"user_api_key_hash": owner, "model_group": "claude"},
            }
        }

    assert request_key(kw("alice")) == request_key(kw("alice"))
    assert request_key(kw("alice")) != request_key(kw("bob"))
    assert request_key(kw("alice", "t2")) != request_key(kw("alice"))
    assert request_key({}) is None
    # A plain call (no Router, no header) keeps nothing: its trace id is new every time.
    assert request_key({"litellm_params": {"litellm_trace_id": "t1", "metadata": {}}}) is None


async def test_replays_expire_and_stay_bounded() -> None:
    replays = Replays(ttl_s=0.05, size=2)
    future, first = replays.claim("k")
    assert first
    future.set_result(object())  # type: ignore[arg-type]
    assert replays.claim("k")[1] is False
    await asyncio.sleep(0.06)
    assert replays.claim("k")[1] is True  # expired: a new request
    replays.claim("a")
    replays.claim("b")
    assert replays.claim("k")[1] is True  # pushed out by the size bound


# -- 3. the operator's policy ------------------------------------------------------------


async def test_proxy_default_refuses_tools_and_cwd_from_a_client(install: Any, env: Env) -> None:
    install(policy=PROXY_DEFAULT)
    with pytest.raises(ccp.ClaudeBadRequestError) as info:
        await litellm.acompletion(
            model=MODEL, messages=user("rm -rf"), claude={"enable_tools": True, "cwd": "/"}
        )
    assert "['cwd', 'enable_tools'] are not allowed" in str(info.value)
    assert prompts_run(env) == []
    resp = await litellm.acompletion(model=MODEL, messages=user("hi"), claude={"max_turns": 2})
    argv = env.invocations()[-1]["argv"]
    assert argv[argv.index("--tools") + 1] == ""  # no tools at all
    # A request with no claude={...} at all is held to the same ceiling.
    await litellm.acompletion(model=MODEL, messages=user("no options"))
    argv = env.invocations()[-1]["argv"]
    assert argv[argv.index("--tools") + 1] == ""
    fields = resp.choices[0].message.provider_specific_fields
    assert set(fields) == {"claude_session_id", "claude_cost_usd"}  # no claude_result


async def test_fixed_options_cwd_root_and_tools_ceiling(
    install: Any, env: Env, tmp_path: Path
) -> None:
    root = tmp_path / "projects"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    policy = Policy(
        client_options=frozenset({"cwd", "tools", "session_id"}),
        options={"max_turns": 3},
        cwd_root=str(root),
        tools=["Read", "Grep"],
    )
    install(policy=policy)

    async def ask(claude: dict[str, Any] | None = None, **options: Any) -> Any:
        if claude is None and not options:
            return await litellm.acompletion(model=MODEL, messages=user("go"))
        return await litellm.acompletion(
            model=MODEL, messages=user("go"), claude={**(claude or {}), **options}
        )

    await ask(cwd=str(root / "a"), tools=["Read"])
    argv = env.invocations()[-1]["argv"]
    assert argv[argv.index("--tools") + 1] == "Read"
    assert argv[argv.index("--max-turns") + 1] == "3"
    await ask(cwd=str(root / "a"))
    argv = env.invocations()[-1]["argv"]
    assert argv[argv.index("--tools") + 1] == "Read,Grep"  # the ceiling is the default
    refusals: list[tuple[dict[str, Any] | None, str]] = [
        ({"cwd": str(root / "a"), "tools": ["Bash"]}, "beyond this policy"),
        ({"cwd": str(tmp_path / "outside")}, "outside"),
        ({"cwd": str(root / "escape")}, "outside"),
        ({"cwd": str(root / "a"), "max_turns": 50}, "not allowed"),
        ({}, "needs an explicit cwd"),
        (None, "needs an explicit cwd"),  # no claude={...} at all
    ]
    for claude, needle in refusals:
        with pytest.raises(ccp.ClaudeBadRequestError, match=needle):
            await ask(claude)
    assert len(env.invocations()) == 2


def test_policy_validation_and_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown option keys"):
        Policy(client_options=frozenset({"bogus"}))
    with pytest.raises(ValueError, match="absolute"):
        Policy(cwd_root="relative")
    assert Policy.load('{"tools": ["Read"]}').tools == ["Read"]
    path = tmp_path / "policy.yaml"
    path.write_text("client_options: [session_id]\nexpose_internals: false\n")
    loaded = Policy.load(str(path))
    assert loaded.client_options == frozenset({"session_id"})
    assert not loaded.expose_internals
    monkeypatch.setenv("KSI_PROVIDER_POLICY", str(path))
    assert ccp.ClaudeCLIProvider(default_policy=OPEN).policy == loaded
    monkeypatch.delenv("KSI_PROVIDER_POLICY")
    assert ccp.ClaudeCLIProvider(default_policy=PROXY_DEFAULT).policy is PROXY_DEFAULT
    with pytest.raises(PolicyViolation, match="set by the operator"):
        Policy(options={"max_turns": 1}).options_for({"max_turns": 9}, None)


# -- 4. spend is recorded, streamed or not --------------------------------------------------


class Spend(CustomLogger):
    def __init__(self) -> None:
        super().__init__()
        self.costs: list[tuple[float | None, float | None]] = []

    async def async_log_success_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        standard = kwargs.get("standard_logging_object") or {}
        self.costs.append((kwargs.get("response_cost"), standard.get("response_cost")))


async def test_spend_is_recorded_for_streamed_and_plain_turns(install: Any) -> None:
    install()
    spend = Spend()
    saved = list(litellm.callbacks)
    litellm.callbacks = [*saved, spend]
    try:
        plain = await litellm.acompletion(model=MODEL, messages=user("plain"))
        stream = await litellm.acompletion(model=MODEL, messages=user("streamed"), stream=True)
        cost = None
        async for chunk in stream:
            cost = getattr(chunk, "claude_cost_usd", None) or cost
        for _ in range(100):
            if len(spend.costs) == 2:
                break
            await asyncio.sleep(0.02)
    finally:
        litellm.callbacks = saved
    expected = [plain._hidden_params["response_cost"], cost]
    assert all(c and c > 0 for c in expected)
    assert sorted(spend.costs) == sorted((c, c) for c in expected)


# -- 5. a failed stream fails before its first chunk ---------------------------------------


async def test_a_failing_stream_yields_nothing_before_its_error(install: Any) -> None:
    install()
    stream = await litellm.acompletion(model=MODEL, messages=user("[[error:401]]"), stream=True)
    with pytest.raises(ccp.ClaudeAuthenticationError) as info:
        await anext(stream)  # the very first chunk is the error: a proxy can still say 401
    await stream.aclose()
    assert info.value.headers == {"x-should-retry": "false"}


# -- 8. a health probe is free ----------------------------------------------------------------


@pytest.mark.parametrize("key", ["sk-fake", ""])
async def test_health_probe_runs_no_turn(env: Env, key: str) -> None:
    cli_env = {**NO_CREDENTIALS, "ANTHROPIC_API_KEY": key}
    engine = env.engine(extra_env={"CLAUDE_CONFIG_DIR": str(env.config), **cli_env})
    provider = ccp.ClaudeCLIProvider(engine)
    probe = {"litellm_params": {"litellm_metadata": {"tags": ["litellm-internal-health-check"]}}}
    try:
        if key:
            resp = await provider.acompletion(MODEL, user("Hey how's it going?"), **probe)
            assert resp.choices[0].message.content == "ok"
            assert resp._hidden_params["response_cost"] == 0.0
        else:
            with pytest.raises(ccp.ClaudeAuthenticationError, match="Not logged in"):
                await provider.acompletion(MODEL, user("Hey how's it going?"), **probe)
    finally:
        await engine.aclose()
    assert env.invocations() == []
