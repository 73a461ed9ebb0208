"""Shared fixtures: tiny study files on real SQLite files in a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"


@pytest.fixture
def quick_study(tmp_path: Path) -> Path:
    """studies/quick.toml copied into tmp_path, so its SQLite file and artifacts land there."""
    path = tmp_path / "quick.toml"
    path.write_text((ROOT / "studies" / "quick.toml").read_text())
    return path


@pytest.fixture(autouse=True)
def _no_ambient_storage(monkeypatch):
    """A developer's $CYCLE_OPTUNA_STORAGE must not redirect tests to their database."""
    monkeypatch.delenv("CYCLE_OPTUNA_STORAGE", raising=False)
