"""Imports every benchmark module so that its functions register themselves.

To add benchmarks (e.g. the warm-session set of issue 6), write a module that uses
:func:`bench.core.benchmark` and import it here.
"""

from __future__ import annotations

from bench import acp, live, mcp_face, permissions, realcli, sockets, spawn, startup, warm
from bench.core import REGISTRY

__all__ = [
    "REGISTRY",
    "acp",
    "live",
    "mcp_face",
    "permissions",
    "realcli",
    "sockets",
    "spawn",
    "startup",
    "warm",
]
