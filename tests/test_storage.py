"""Storage URLs: clear one-line errors with masked passwords, SQLite under 4 workers, journal files."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cycle_optuna import storage
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


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'beat.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def _fast_beats(monkeypatch) -> None:
    monkeypatch.setattr(storage, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(storage, "GRACE_SECONDS", 1)  # open_storage makes it interval + 1 = 2 s


def _ask(study: optuna.Study) -> optuna.Trial:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return study.ask()


def test_a_registered_trial_is_failed_and_retried_even_if_its_worker_never_beat(any_url: str, monkeypatch):
    _fast_beats(monkeypatch)
    st = storage.open_storage(any_url)
    study = optuna.create_study(study_name="beat", storage=st)
    registered = _ask(study)
    storage.register_trial(study, registered, "deadhost:1")  # then the worker is killed
    bare = _ask(study)  # a trial nobody registered has no beat, so nothing can find it stale
    assert set(storage.last_heartbeats(st, study)) == {registered.number}
    time.sleep(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert trials[registered.number].state == TrialState.FAIL
    assert trials[bare.number].state == TrialState.RUNNING
    assert trials[-1].state == TrialState.WAITING and trials[-1].user_attrs[storage.WORKER_ATTR] == "deadhost:1"


def test_the_heartbeat_thread_beats_only_for_the_running_trial(tmp_path: Path, monkeypatch):
    _fast_beats(monkeypatch)
    st = storage.open_storage(f"sqlite:///{tmp_path / 'beat.db'}")
    study = optuna.create_study(study_name="beat", storage=st)
    trial = _ask(study)
    storage.register_trial(study, trial, "box:1")
    first = storage.last_heartbeats(st, study)[trial.number]
    with storage.Heartbeat(st) as beat:
        beat.beat_for(trial._trial_id)
        time.sleep(2.5)
        later = storage.last_heartbeats(st, study)[trial.number]
        beat.beat_for(None)
        time.sleep(1.5)
        assert storage.last_heartbeats(st, study)[trial.number] == later
    assert later > first


def test_sqlite_studies_use_write_ahead_logging(tmp_path: Path):
    storage.open_storage(f"sqlite:///{tmp_path / 'wal.db'}").get_all_studies()
    assert sqlite3.connect(tmp_path / "wal.db").execute("PRAGMA journal_mode").fetchone() == ("wal",)
