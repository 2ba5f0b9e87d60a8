"""KSI daemon: a local Unix-socket service that runs the Claude Code CLI for other programs.

The package is split by job: ``server`` (socket + framing), ``protocol`` (wire envelopes),
``registry`` and ``commands`` (what a request can do), ``store`` (SQLite state), ``bus``
(events), ``spawner`` (SPAWN: queueing, logs, events around a LiteLLM call) and ``claude``
(the CLI itself: argv, runner, result parsing). ``app`` wires them together.
"""

from __future__ import annotations

__version__ = "0.1.0"
