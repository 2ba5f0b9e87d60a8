"""Claude Code CLI integration: options, argv, process runner, result parsing, engine.

Only this package knows how the ``claude`` binary is driven. The LiteLLM
provider (``claude_cli_provider.py``) and the daemon's commands call
:class:`ClaudeEngine`; nothing here imports LiteLLM.
"""

from __future__ import annotations

from daemon.claude.backends import TurnStream
from daemon.claude.engine import CURRENT_ENGINE, ClaudeEngine, EngineConfig
from daemon.claude.errors import ClaudeCLIError, ErrorCode
from daemon.claude.options import ClaudeOptions, StartInfo
from daemon.claude.results import TurnResult

__all__ = [
    "CURRENT_ENGINE",
    "ClaudeCLIError",
    "ClaudeEngine",
    "ClaudeOptions",
    "EngineConfig",
    "ErrorCode",
    "StartInfo",
    "TurnResult",
    "TurnStream",
]
