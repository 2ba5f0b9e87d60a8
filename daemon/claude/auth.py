"""Does the CLI have credentials? HEALTH_CHECK's answer, without running a turn.

A CLI without credentials still starts, answers every turn with ``"Not logged in · Please run
/login"`` (``api_error_status`` null, no API call) and exits 1; a daemon in that state used to
report itself healthy. :func:`credential_source` looks where the CLI looks, in the
environment the CLI gets; :class:`AuthWatch` adds what the turns themselves said, because
only the API can tell whether a key is valid.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.errors import ErrorCode
from daemon.protocol import iso_from_epoch

# Environment variables the CLI takes credentials (or a cloud provider's own auth) from.
CREDENTIAL_ENV = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
    "CLAUDE_CODE_USE_FOUNDRY",
)
_CHECK_EVERY_S = 10.0  # HEALTH_CHECK is a hot probe; a login is rare


def _config_dir(env: Mapping[str, str]) -> Path:
    configured = env.get("CLAUDE_CONFIG_DIR")
    if configured:
        return Path(configured)
    return Path(env.get("HOME") or Path.home()) / ".claude"


def _settings_source(path: Path) -> str | None:
    """``apiKeyHelper`` or a key in the ``env`` block of a settings file."""
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(settings, dict):
        return None
    if settings.get("apiKeyHelper"):
        return f"apiKeyHelper in {path}"
    block = settings.get("env")
    if isinstance(block, dict):
        for name in CREDENTIAL_ENV:
            if block.get(name):
                return f"{name} in {path}"
    return None


def credential_source(env: Mapping[str, str]) -> str | None:
    """Where the CLI would find credentials, or None when it would say "Not logged in"."""
    for name in CREDENTIAL_ENV:
        if env.get(name):
            return name
    config = _config_dir(env)
    if (config / ".credentials.json").is_file():
        return f"{config / '.credentials.json'} (claude /login)"
    if sys.platform == "darwin":
        return "macOS keychain (not checked)"  # /login keeps it there; reading needs a prompt
    return _settings_source(config / "settings.json")


@dataclass
class _Failure:
    message: str
    at: float


class AuthWatch:
    """The credentials as HEALTH_CHECK reports them: ``ok``, ``missing`` (none where the CLI
    looks) or ``failed`` (the last turn was refused for its credentials; a later successful
    turn clears it)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self._source: str | None = None
        self._checked_at = -_CHECK_EVERY_S
        self._failure: _Failure | None = None

    def turn_ended(self, code: ErrorCode | None, message: str = "") -> None:
        """Called with every finished turn's error code (None: it succeeded)."""
        if code is ErrorCode.AUTH_FAILED:
            self._failure = _Failure(message, time.time())
        elif code is None:
            self._failure = None

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._checked_at >= _CHECK_EVERY_S:
            self._source = credential_source(self._env)
            self._checked_at = now
        if self._failure is not None:
            return {
                "status": "failed",
                "source": self._source,
                "message": self._failure.message,
                "at": iso_from_epoch(self._failure.at),
            }
        if self._source is None:
            return {
                "status": "missing",
                "source": None,
                "message": "no credentials where the CLI looks: set ANTHROPIC_API_KEY "
                "(e.g. in the daemon's environment) or run `claude` once and /login",
            }
        return {"status": "ok", "source": self._source}
