"""``./scripts/run --stub``: the daemon as usual, its CLI answered by the loopback stub API.

Every README command can then be tried without Anthropic credentials and without cost: the
real Claude Code CLI runs, but its API is :class:`devtools.stub_api.StubAPI` on 127.0.0.1
(offline switches from claude-cli.md §2, its own ``CLAUDE_CONFIG_DIR`` in the state dir).
Arguments go to ``daemon.py``.
"""

from __future__ import annotations

import os
import sys

from daemon.app import flag_overrides
from daemon.app import main as daemon_main
from daemon.settings import Settings
from devtools.stub_api import OFFLINE_CLI_ENV, StubAPI


def main(argv: list[str] | None = None) -> int:
    settings = Settings(**flag_overrides(sys.argv[1:] if argv is None else argv))
    config_dir = settings.state_path / "stub-claude-config"
    config_dir.mkdir(parents=True, exist_ok=True)
    with StubAPI() as stub:
        # The daemon's CLI children inherit this environment.
        os.environ.update(OFFLINE_CLI_ENV)
        os.environ["ANTHROPIC_BASE_URL"] = stub.url
        os.environ["CLAUDE_CONFIG_DIR"] = str(config_dir)
        print(
            f"stub Anthropic API on {stub.url}: turns are answered offline, nothing is billed",
            file=sys.stderr,
            flush=True,
        )
        return daemon_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
