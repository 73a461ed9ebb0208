"""Storage URLs: clear one-line errors with masked passwords, SQLite under 4 workers, journal files."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cycle_optuna.cli import main
from workers_helpers import worker_env, write_study


@pytest.mark.parametrize("url, words", [
    ("nosuchdb://u:s3cret@h/x", "cannot open storage"),
    ("postgresql+psycopg://u:s3cret@127.0.0.1:1/x", "cannot open storage"),
    ("postgresql+psycopg://nosuchuser:s3cret@127.0.0.1:5432/postgres", "cannot open storage"),
    ("not a url", "bad storage URL"),
])
def test_bad_storage_is_one_masked_line_and_exit_2(tmp_path: Path, capsys, url: str, words: str):
    study = write_study(tmp_path)
    assert main(["status", str(study), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert words in err and "s3cret" not in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) <= 3  # one message (rich may wrap it)


@pytest.mark.slow
def test_sqlite_four_workers_forty_trials_never_locked(tmp_path: Path):
    study = write_study(tmp_path, n_trials=40)
    proc = subprocess.run([sys.executable, "-m", "cycle_optuna.cli", "run", str(study), "--workers", "4"],
                          env=worker_env(), capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("tiny-worker-*.log"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert "locked" not in logs.lower()
    states = sqlite3.connect(tmp_path / "tiny.db").execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall()
    assert states == [("COMPLETE", 40)]


def test_journal_storage_runs_a_study(tmp_path: Path):
    study = write_study(tmp_path, n_trials=2)
    assert main(["worker", str(study), "--storage", f"journal:///{tmp_path / 'tiny.log'}"]) == 0
    assert (tmp_path / "tiny.log").stat().st_size > 0
