"""Shared fixtures: tiny study files on real SQLite files in a temporary directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"


def pytest_configure(config):
    """Under pytest-xdist (the project's default, `-n 2`), each test process gets its share of the
    cores for torch's intra-op threads: two processes of 2 threads each on 2 cores made CPU-bound
    tests several times slower than one process."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(workers)))


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


@contextlib.contextmanager
def pg_reader(pg_url: str):
    """`pg_url` as a new login role that may read every table of the database but write none; the
    role is dropped afterwards."""
    import uuid

    import psycopg

    role, plain = f"reader_{uuid.uuid4().hex[:8]}", pg_url.replace("postgresql+psycopg", "postgresql")
    with pg_admin_connect() as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
        yield pg_url.replace(f"://{PG_USER}@", f"://{role}@")
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
        with pg_admin_connect() as admin:
            admin.execute(f'DROP ROLE "{role}"')


# Tests run in parallel (pytest-xdist). A test that stops or restarts the server (marker
# `pg_restarts`) holds this machine-wide lock alone; every other test using the server shares it.
_PG_LOCK = Path(tempfile.gettempdir()) / "cycle-optuna-tests-postgres.lock"
_held = {"exclusive": False}


@contextlib.contextmanager
def _server_lock(exclusive: bool):
    with open(_PG_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        _held["exclusive"] = exclusive
        try:
            yield
        finally:
            _held["exclusive"] = False
            fcntl.flock(f, fcntl.LOCK_UN)


def pg_cluster(action: str, *args: str) -> None:
    """pg_ctlcluster ACTION on the local server (a real stop, start or restart); only from a test
    marked `pg_restarts`, which then has the server to itself."""
    if not _held["exclusive"]:
        raise RuntimeError("a test that stops or restarts PostgreSQL must be marked pg_restarts")
    cluster = next(Path("/etc/postgresql").iterdir()).name
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", action, *args], check=True,
                   timeout=60, capture_output=True)


@pytest.fixture
def pg_url(request):
    """postgresql+psycopg:// URL of a new, empty database, dropped after the test.

    Skipped when no server answers on 127.0.0.1:5432, except under CI=true where that fails.
    """
    with _server_lock(exclusive=request.node.get_closest_marker("pg_restarts") is not None):
        yield from _new_database()


def _new_database():
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
