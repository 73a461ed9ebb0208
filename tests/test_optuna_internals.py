"""Each use of Optuna's private API (cycle_optuna/optuna_internals.py) against the installed release.

A failure here means an Optuna upgrade changed something the workers rely on: fix that module.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from cycle_optuna import optuna_internals as internals
from cycle_optuna import storage


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    st = RDBStorage(f"sqlite:///{tmp_path / 'i.db'}", heartbeat_interval=1, grace_period=1)
    return optuna.create_study(study_name="internals", storage=st)


def _ask(study: optuna.Study) -> optuna.Trial:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return study.ask()


def test_the_study_storage_and_its_backend(study):
    st = internals.storage_of(study)
    assert st is study._storage
    backend = internals.backend_of(st)
    assert isinstance(backend, RDBStorage)  # under Optuna's caching wrapper
    assert internals.study_id_of(study) == backend.get_study_id_from_name("internals")


def test_trial_ids_match_the_storage(study):
    trial = _ask(study)
    frozen = internals.storage_of(study).get_trial(internals.trial_id_of(trial))
    assert frozen.number == trial.number and internals.trial_id_of(frozen) == frozen._trial_id


def test_an_inserted_heartbeat_is_the_one_optuna_reads_for_staleness(study):
    trial = _ask(study)
    backend = internals.backend_of(internals.storage_of(study))
    assert backend._get_stale_trial_ids(internals.study_id_of(study)) == []  # no beat: Optuna never fails it
    with backend.engine.begin() as conn:
        internals.insert_heartbeat(conn, internals.trial_id_of(trial))
    time.sleep(2.2)
    assert backend._get_stale_trial_ids(internals.study_id_of(study)) == [internals.trial_id_of(trial)]
    backend.record_heartbeat(internals.trial_id_of(trial))  # Optuna updates the row we inserted
    assert backend._get_stale_trial_ids(internals.study_id_of(study)) == []


def test_an_inserted_user_attr_reads_back_through_optuna_even_on_a_finished_trial(study):
    trial = _ask(study)
    study.tell(trial, 1.0)
    backend = internals.backend_of(internals.storage_of(study))
    with backend.engine.begin() as conn:
        internals.insert_user_attr(conn, internals.trial_id_of(trial), "why", {"a": [1, "x"]})
    assert study.trials[0].user_attrs == {"why": {"a": [1, "x"]}}


def test_tell_returns_the_final_state_and_any_refusal(study):
    ok, bad, pruned = _ask(study), _ask(study), _ask(study)
    assert internals.tell(study, ok, 0.5, None) == (TrialState.COMPLETE, None)
    state, refusal = internals.tell(study, bad, math.nan, None)
    assert state == TrialState.FAIL and "nan" in refusal.lower()
    assert internals.tell(study, pruned, None, TrialState.PRUNED)[0] == TrialState.PRUNED
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    assert study.trials[0].value == 0.5


def test_tell_of_a_trial_another_worker_failed_raises_update_finished(study):
    trial = _ask(study)
    assert internals.storage_of(study).set_trial_state_values(internals.trial_id_of(trial), TrialState.FAIL)  # stale
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        internals.tell(study, trial, 0.5, None)
    assert study.trials[0].state == TrialState.FAIL


def test_retry_callback_keeps_the_attrs_the_resume_and_the_cap_read(study):
    trial = _ask(study)
    trial.set_user_attr("checkpoint_artifact_id", "checkpoint-x")
    study.tell(trial, state=TrialState.FAIL)
    storage.retry_callback()(study, study.trials[0])
    retry = study.trials[1]
    assert retry.state == TrialState.WAITING
    assert retry.system_attrs["failed_trial"] == 0 and retry.system_attrs["retry_history"] == [0]
    assert retry.user_attrs["checkpoint_artifact_id"] == "checkpoint-x"


def test_the_raw_queries_read_optunas_tables(study):
    done, running, retried = _ask(study), _ask(study), _ask(study)
    study.tell(done, 1.0)
    study.tell(retried, state=TrialState.FAIL)
    storage.retry_callback()(study, study.trials[retried.number])
    backend = internals.backend_of(internals.storage_of(study))
    backend.record_heartbeat(internals.trial_id_of(running))
    with backend.engine.connect() as conn:
        rows = internals.trial_states_and_retries(conn, internals.study_id_of(study))
        beats = internals.running_trials_and_beats(conn, internals.study_id_of(study))
    assert [(n, state) for n, state, _ in rows] == [(0, "COMPLETE"), (1, "RUNNING"), (2, "FAIL"), (3, "WAITING")]
    assert [history for *_, history in rows][3] == "[2]"
    ((trial_id, number, beat),) = beats
    assert (trial_id, number) == (internals.trial_id_of(running), 1) and beat is not None


def test_a_read_only_open_skips_schema_versions_and_writes_nothing(tmp_path: Path):
    import sqlalchemy
    from optuna.storages._rdb import storage as rdb

    url = f"sqlite:///{tmp_path / 'v.db'}"
    optuna.create_study(study_name="v", storage=url).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:  # a database whose version rows are gone, as an older tool may leave it
        conn.execute(sqlalchemy.text("DELETE FROM version_info"))
        conn.execute(sqlalchemy.text("DELETE FROM alembic_version"))
    real = rdb._VersionManager
    read = storage.open_storage(url, heartbeat=False, create=False)
    assert rdb._VersionManager is real  # restored for the next, writing, open
    assert len(optuna.load_study(study_name="v", storage=read).trials) == 2
    with pytest.raises(RuntimeError, match="read-only"):
        read._version_manager.get_current_version()
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM version_info")).scalar() == 0
    storage.open_storage(url, heartbeat=False, create=True)  # a writer records the version
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM version_info")).scalar() == 1
    engine.dispose()


def test_has_tables_reads_without_creating(tmp_path: Path):
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'h.db'}")
    with engine.connect() as conn:
        assert not internals.has_tables(conn)
    assert (tmp_path / "h.db").stat().st_size == 0  # the check wrote nothing
    optuna.create_study(study_name="h", storage=f"sqlite:///{tmp_path / 'h.db'}")
    with engine.connect() as conn:
        assert internals.has_tables(conn)
    engine.dispose()
