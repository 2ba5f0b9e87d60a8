"""KSI daemon: a local Unix-socket service that runs the Claude Code CLI for other programs.

The package is split by job: ``server`` (the socket: framing, connections), ``protocol`` (wire
envelopes), ``commands`` (what a request can do, and the registry that dispatches it),
``turns`` (SPAWN: idempotency, queueing, recording and announcing a turn around a LiteLLM
call), ``state`` (SQLite records, the turn log), ``events`` (the bus, observer plugins) and
``claude`` (the CLI itself: argv, child processes, warm sessions, results). ``app`` wires
them together.
"""

from __future__ import annotations

__version__ = "0.1.0"
