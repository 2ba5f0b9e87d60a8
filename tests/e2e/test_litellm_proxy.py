"""The shipped LiteLLM proxy config, from an installed package, driven by the openai SDK.

The project is installed (``pip install --no-deps --no-build-isolation``, offline) into a
fresh venv whose dependencies come from the test venv through a ``.pth`` file, and the proxy
runs from that venv outside the checkout with ``deploy/litellm/config.yaml`` as shipped
(plus a spend-recording callback). Real CLI, loopback stub API; the openai client keeps its
default ``max_retries=2``, so a resent request would show up as a second API call.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from devtools.stub_api import StubAPI
from tests.e2e.conftest import PROJECT_ROOT
from tests.helpers import wait_for

MASTER_KEY = "sk-ksi-test-0123456789abcdef0123456789abcdef"
SPEND_LOGGER = """
import json, os
from litellm.integrations.custom_logger import CustomLogger

class Spend(CustomLogger):
    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        entry = {"stream": bool(kwargs.get("stream")), "cost": kwargs.get("response_cost"),
                 "logged": (kwargs.get("standard_logging_object") or {}).get("response_cost")}
        with open(os.environ["SPEND_LOG"], "a") as f:
            f.write(json.dumps(entry) + "\\n")

logger = Spend()
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with the project installed as a package; returns its python."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (purelib / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(PROJECT_ROOT),
        ],
        check=True,
        cwd=venv,
    )
    for script in ("ksi-daemon", "ksi"):
        assert (venv / "bin" / script).is_file()
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def proxy(
    installed: Path,
    real_claude_bin: Path,
    claude_env: dict[str, str],
    claude_cwd: Path,
    tmp_path: Path,
) -> Iterator[tuple[str, Path]]:
    """The proxy's base URL and its spend log."""
    config = yaml.safe_load((PROJECT_ROOT / "deploy" / "litellm" / "config.yaml").read_text())
    config["litellm_settings"]["callbacks"].append("spend_logger.logger")
    conf_dir = tmp_path / "proxy"
    conf_dir.mkdir()
    (conf_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (conf_dir / "spend_logger.py").write_text(SPEND_LOGGER)
    spend = tmp_path / "spend.jsonl"
    port = free_port()
    env = {k: v for k, v in claude_env.items() if k != "PYTHONPATH"}
    env.update(
        LITELLM_MASTER_KEY=MASTER_KEY,
        KSI_CLAUDE_BIN=str(real_claude_bin),
        SPEND_LOG=str(spend),
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
    )
    log = (tmp_path / "proxy.log").open("wb")
    proc = subprocess.Popen(
        [
            str(installed),
            "-m",
            "litellm.proxy.proxy_cli",
            "--config",
            str(conf_dir / "config.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=claude_cwd,  # outside the checkout: the package must be what is imported
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "proxy.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/health/liveliness", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 90)
        yield url, spend
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def calls_with(stub: StubAPI, text: str) -> int:
    """Messages API calls whose conversation holds ``text`` (the prompts here are unique)."""
    calls = [r for r in stub.requests() if r["method"] == "POST" and r["path"] == "/v1/messages"]
    return sum(text in json.dumps(r["body"]["messages"]) for r in calls)


def fields(obj: Any) -> dict[str, Any]:
    extra = obj.model_extra or {}
    found: dict[str, Any] = extra.get("provider_specific_fields") or {}
    return found


def test_openai_sdk_through_the_shipped_proxy_config(
    proxy: tuple[str, Path], stub_api: StubAPI
) -> None:
    url, spend = proxy
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=MASTER_KEY)  # max_retries=2

    first = client.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "remember the word kiwi"}]
    )
    assert first.choices[0].message.content
    sid = fields(first.choices[0].message)["claude_session_id"]
    assert "claude_result" not in fields(first.choices[0].message)  # no CLI internals

    second = client.chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "which word?"}],
        extra_body={"claude": {"session_id": sid}},
    )
    assert fields(second.choices[0].message)["claude_session_id"] == sid
    last = [r for r in stub_api.requests() if r["path"] == "/v1/messages"][-1]
    assert "remember the word kiwi" in json.dumps(last["body"]["messages"])  # resumed

    stream = client.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "stream please"}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert fields(chunks[0].choices[0].delta)["claude_session_id"]

    for status, error, streamed in [
        (429, openai.RateLimitError, True),
        (401, openai.AuthenticationError, False),  # not the router's cooldown 429
        (429, openai.RateLimitError, False),
        (529, openai.InternalServerError, False),
        (401, openai.AuthenticationError, True),
    ]:
        prompt = f"[[error:{status}]] streamed={streamed}"
        # Streamed too, the status arrives as the HTTP status: create() raises it.
        with pytest.raises(error) as info:
            client.chat.completions.create(
                model="claude", messages=[{"role": "user", "content": prompt}], stream=streamed
            )
        assert info.value.status_code == status
        assert info.value.response.headers["x-should-retry"] == "false"
        assert calls_with(stub_api, prompt) == 1, f"{prompt} ran more than once"

    with pytest.raises(openai.BadRequestError, match="not allowed"):
        client.chat.completions.create(
            model="claude",
            messages=[{"role": "user", "content": "run a shell"}],
            extra_body={"claude": {"enable_tools": True, "cwd": "/"}},
        )
    assert calls_with(stub_api, "run a shell") == 0

    before = len(stub_api.requests())
    health = httpx.get(
        f"{url}/health", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30
    ).json()
    assert health["healthy_count"] == 2, health
    assert len(stub_api.requests()) == before  # the probe ran no turn

    def both_logged() -> bool:
        if not spend.exists():
            return False
        kinds = {e["stream"] for e in map(json.loads, spend.read_text().splitlines())}
        return kinds == {True, False}

    wait_for(both_logged, 10)
    entries = [json.loads(line) for line in spend.read_text().splitlines()]
    turns = [e for e in entries if e["cost"]]
    assert sorted(e["stream"] for e in turns) == [False, False, True], entries
    assert all(e["cost"] > 0 and e["logged"] == e["cost"] for e in turns), entries
    # The rest are the two health probes: logged, and free.
    assert [e["cost"] for e in entries if not e["cost"]] == [0.0, 0.0], entries
