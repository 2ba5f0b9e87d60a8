"""One frozen settings object, built once at start-up and handed down.

Precedence: command-line flag > ``KSI_*`` environment variable > default. Relative paths
are resolved against the project root (the checkout holding ``daemon.py``; for an installed
package, ``~/.local/state/ksi``), so the daemon behaves the same whatever directory it was
started from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from daemon.claude import defaults


def _project_root() -> Path:
    """The checkout (the directory holding ``daemon.py``) when run from one; installed as a
    package (``pip install .``), a per-user state directory instead of site-packages:
    ``$XDG_STATE_HOME/ksi``, by default ``~/.local/state/ksi``."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "daemon.py").is_file():
        return checkout
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "ksi"


PROJECT_ROOT = _project_root()

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Everything the daemon can be configured with. See README.md for the table."""

    model_config = SettingsConfigDict(env_prefix="KSI_", frozen=True, extra="forbid")

    project_root: Path = PROJECT_ROOT
    socket: Path = Path("sockets/claude_daemon.sock")
    state_dir: Path = Path("state")
    log_dir: Path = Path("claude_logs")
    # Prompt compositions (daemon/compositions.py): YAML recipes in <prompts_dir>/compositions/
    # and the markdown components they assemble in <prompts_dir>/components/ (KSI's layout).
    prompts_dir: Path = Path("prompts")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    # Wire limits.
    max_line_bytes: int = Field(default=8 * MiB, ge=1024)
    subscriber_queue: int = Field(default=1000, ge=1)
    event_history: int = Field(default=10_000, ge=100)
    # Bytes of SQLite writes queued before awaited writers (and PUBLISH) wait; fire-and-forget
    # writes are refused past twice this (see daemon/state/db.py).
    store_queue_bytes: int = Field(default=8 * MiB, ge=MiB)
    # Memory bounds in bytes (a count alone let 250 PUBLISHes of 4 MB hold 1 GB).
    max_event_bytes: int = Field(default=1 * MiB, ge=1024)  # a PUBLISHed event's wire line
    subscriber_queue_bytes: int = Field(default=16 * MiB, ge=1024)  # one subscriber's backlog
    # Incomplete request lines held by all connections together (each holds at most
    # max_line_bytes), and how long one may sit there without a byte arriving.
    max_pending_input_bytes: int = Field(default=64 * MiB, ge=1024)
    partial_line_timeout_s: float = Field(default=30.0, gt=0)

    # Claude runs.
    claude_bin: str | None = None
    # Environment for the CLI processes only, over the daemon's own (KSI_CLAUDE_ENV is JSON):
    # e.g. ANTHROPIC_BASE_URL or CLAUDE_CONFIG_DIR for the turns, not for the daemon.
    claude_env: dict[str, str] = Field(default_factory=dict)
    default_model: str = "sonnet"
    max_concurrency: int = Field(default=4, ge=1)
    default_timeout_s: float = Field(default=defaults.TIMEOUT_S, gt=0)
    term_grace_s: float = Field(default=defaults.TERM_GRACE_S, ge=0)
    idempotency_window_s: float = Field(default=600.0, ge=0)
    # CLAUDE_CODE_MAX_RETRIES for every CLI run unless the daemon's own environment sets it.
    # 0: the daemon retries instead (below), visibly and with the queue held while the API
    # rate-limits; the CLI's own loop would hold a failing run for ~3 minutes, unseen.
    cli_max_retries: int | None = Field(default=0, ge=0, le=15)
    # Daemon retries of a turn that failed on a transient API error (429, 5xx, 529,
    # connection) before it did any paid work: exponential backoff from api_retry_base_s,
    # capped at api_retry_max_s, plus up to 25 % jitter.
    api_retries: int = Field(default=3, ge=0, le=10)
    api_retry_base_s: float = Field(default=1.0, gt=0, le=60)
    api_retry_max_s: float = Field(default=30.0, gt=0, le=300)

    # Warm sessions (one long-lived CLI per active session) and the pre-warmed pool.
    warm_default: bool = defaults.WARM_DEFAULT
    warm_idle_s: float = Field(default=defaults.WARM_IDLE_S, gt=0)
    # None: as many as the memory available at start holds (defaults.warm_max_for_memory).
    warm_max: int | None = Field(default=None, ge=0)
    # None: one pre-warmed CLI when turns are warm by default, none otherwise.
    warm_pool_size: int | None = Field(default=None, ge=0)

    # Permission relay (daemon/turns/permissions.py): a SPAWN's permissions,
    # permission_timeout_s and permission_default when it does not say.
    permissions: Literal["cli", "relay"] = "cli"
    permission_timeout_s: float = Field(default=60.0, gt=0, le=7 * 24 * 3600)
    permission_default: Literal["allow", "deny"] = "deny"
    # How long a session awaits input after a turn before its warm CLI is released
    # (daemon/turns/idle.py), when its SPAWNs did not say.
    session_idle_s: float = Field(default=660.0, gt=0)
    # A session's turn cap when it has none of its own (daemon/turns/limits.py); None: off.
    max_iterations: int | None = Field(default=None, ge=1)

    # The KSI MCP face (daemon/mcp_face): turns call the daemon as tools mcp__ksi__*.
    # ``mcp``: serve it (on loopback, started at the first turn that uses it). A turn another
    # turn spawned is refused past ``spawn_max_depth`` levels below a client's turn, or when
    # its parent already has ``spawn_max_children`` live children.
    mcp: bool = True
    spawn_max_depth: int = Field(default=3, ge=0, le=100)
    spawn_max_children: int = Field(default=8, ge=1, le=1000)
    # Conversations between agents that answer their messages (daemon/agents): one ends
    # after this many answering turns, or once it has cost this much (None: no budget),
    # unless its first message set its own limits.
    conversation_max_turns: int = Field(default=20, ge=1, le=10_000)
    conversation_max_cost_usd: float | None = Field(default=None, gt=0)

    # Cognitive observers: "package.module:factory" or an entry point name in "ksi.observers".
    observers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    observer_queue: int = Field(default=1000, ge=1)
    observer_timeout_s: float = Field(default=10.0, gt=0)

    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # Import LiteLLM (~2 s of CPU) right after start-up, or only at the first SPAWN.
    litellm_preload: bool = True
    warm_up_litellm: bool = True

    @field_validator("observers", mode="before")
    @classmethod
    def _split_observers(cls, value: Any) -> Any:
        # Environment variables carry a comma-separated list; the CLI may repeat the flag.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.project_root / path)

    @property
    def pool_size(self) -> int:
        """Pre-warmed CLIs to keep (see ``warm_pool_size``)."""
        if self.warm_pool_size is not None:
            return self.warm_pool_size
        return 1 if self.warm_default else 0

    @property
    def socket_path(self) -> Path:
        return self.resolve(self.socket)

    @property
    def pid_path(self) -> Path:
        return self.socket_path.with_suffix(".pid")

    @property
    def state_path(self) -> Path:
        return self.resolve(self.state_dir)

    @property
    def log_path(self) -> Path:
        return self.resolve(self.log_dir)

    @property
    def prompts_path(self) -> Path:
        return self.resolve(self.prompts_dir)
