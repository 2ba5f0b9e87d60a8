"""Shared fixtures: a running daemon subprocess on a short temporary socket path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import DaemonProcess


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    """A daemon that has not loaded LiteLLM (commands other than SPAWN)."""
    d = DaemonProcess().start()
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def spawn_daemon() -> Iterator[DaemonProcess]:
    """A daemon with LiteLLM preloaded, driving the fake claude CLI."""
    d = DaemonProcess(preload=True).start()
    try:
        yield d
    finally:
        d.cleanup()
