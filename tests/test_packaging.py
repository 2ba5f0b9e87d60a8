"""pyproject.toml's package metadata agrees with what the checkout runs with."""

from __future__ import annotations

import tomllib
from pathlib import Path

import daemon
from daemon.acp.server import main as acp_main
from daemon.app import main as daemon_main
from daemon.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_dependencies_are_requirements_txt() -> None:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pins = sorted(
        line.split("#")[0].strip() for line in lines if line.strip() and not line.startswith("#")
    )
    assert sorted(project()["dependencies"]) == pins


def test_version_and_console_scripts() -> None:
    meta = project()
    assert meta["version"] == daemon.__version__
    assert meta["scripts"] == {
        "ksi-daemon": "daemon.app:main",
        "ksi": "daemon.cli:main",
        "ksi-acp": "daemon.acp.server:main",  # fixed: editors' configs name it
    }
    assert callable(daemon_main)
    assert callable(cli_main)
    assert callable(acp_main)
