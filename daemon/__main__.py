"""``python -m daemon`` is the same as ``python daemon.py``."""

from __future__ import annotations

from daemon.app import main

raise SystemExit(main())
