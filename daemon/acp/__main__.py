"""``python -m daemon.acp``: see :mod:`daemon.acp`."""

from __future__ import annotations

from daemon.acp.server import main

raise SystemExit(main())
