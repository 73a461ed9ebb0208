"""Shared fixtures: tiny study files on real SQLite files in a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and the machine is shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# ---------------------------------------------------------------------------------------------
# PostgreSQL (workers at scale): a fresh database per test on the local server.
# ---------------------------------------------------------------------------------------------

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"


def pg_admin_connect():
    """An autocommit psycopg connection to the server's maintenance database."""
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres",
                           autocommit=True, connect_timeout=3)


@pytest.fixture
def pg_url():
    """postgresql+psycopg:// URL of a new, empty database, dropped after the test.

    Skipped when no server answers on 127.0.0.1:5432, except under CI=true where that fails.
    """
    import uuid

    try:
        admin = pg_admin_connect()
    except Exception as e:  # noqa: BLE001 - any reason the server cannot be used
        reason = f"PostgreSQL not reachable on {PG_HOST}:{PG_PORT}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    name = f"cycle_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    with pg_admin_connect() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
