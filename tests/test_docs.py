"""The Python snippets of README.md and LITELLM_INTEGRATION.md marked ``<!-- doc-test -->``
run as written (as scripts, in a fresh interpreter), against the fake CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import FAKE_CLAUDE

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "LITELLM_INTEGRATION.md")
SNIPPET = re.compile(r"<!-- doc-test -->\n```python\n(.*?)```", re.DOTALL)


def snippets() -> list[tuple[str, str]]:
    found = []
    for name in DOCS:
        for i, code in enumerate(SNIPPET.findall((ROOT / name).read_text())):
            found.append((f"{name}#{i}", code))
    return found


def test_the_docs_have_snippets_to_run() -> None:
    assert any(name.startswith("LITELLM_INTEGRATION.md") for name, _ in snippets())


@pytest.mark.parametrize(("name", "code"), snippets(), ids=[n for n, _ in snippets()])
def test_snippet_runs_as_written(name: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(code)
    # Not the test process's LITELLM_LOCAL_MODEL_COST_MAP: the snippet's import order must
    # keep LiteLLM offline by itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM_", "KSI_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        KSI_CLAUDE_BIN=str(FAKE_CLAUDE),
        CLAUDE_CONFIG_DIR=str(tmp_path / "config"),
        ANTHROPIC_API_KEY="fake-key",
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "echo: Summarise README.md (turn 1)" in done.stdout
    assert "echo: and now? (turn 2)" in done.stdout  # the same session, resumed
    assert "echo: hi (turn 1)" in done.stdout
    for noise in ("model_prices", "cost map", "Traceback", "Give Feedback"):
        assert noise not in out, out[-3000:]
