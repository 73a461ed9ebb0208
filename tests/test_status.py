"""`status`: the total stored on the study, failures with their cause (real exceptions, SIGKILL, PG restart)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cycle_optuna import api, cli, status, totals, worker
from conftest import pg_cluster
from workers_helpers import start_cli, trials, wait_for, write_study


def _status(capsys, study: Path, *extra: str) -> str:
    capsys.readouterr()
    assert cli.main(["status", str(study), *extra]) == 0
    return capsys.readouterr().out


def test_the_total_is_stored_on_the_study_and_status_agrees(tmp_path, capsys):
    study = write_study(tmp_path, n_trials=1)
    assert cli.main(["run", str(study), "--n-trials", "2"]) == 0
    db = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}")
    assert db.user_attrs[totals.N_TRIALS_ATTR] == 2
    assert "2 of 2 trials finished" in _status(capsys, study)  # not "of 1", the file's total
    import optuna_dashboard

    assert optuna_dashboard.get_note(db).startswith("## cycle-optuna summary of tiny\n\n2 cycles: ")  # end of run
    # no flag: the larger of file (1) and study (2); nothing to do
    assert cli.main(["run", str(study)]) == 0
    assert "already holds 2 of 2 trials" in capsys.readouterr().out
    assert len(db.get_trials()) == 2


def test_a_total_below_what_the_study_holds_says_so(tmp_path, capsys):
    study = write_study(tmp_path, n_trials=2)
    assert cli.main(["run", str(study)]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(study), "--n-trials", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("study 'tiny' already holds 2 trials, more than the requested total of 1; "
                                   "pass --n-trials 3 or more to grow it")
    capsys.readouterr()
    assert cli.main(["worker", str(study), "--n-trials", "1"]) == 2  # a worker can do nothing useful
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "already holds 2 trials" in captured.err
    db = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}")
    assert len(db.get_trials()) == 2 and db.user_attrs[totals.N_TRIALS_ATTR] == 2


def test_an_exception_is_the_failure_cause_shown_by_status(tmp_path, capsys):
    path = write_study(tmp_path, n_trials=2)
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = optuna.create_study(study_name="tiny", storage=url)

    def objective(trial):
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        if trial.number == 0:
            raise RuntimeError("shape mismatch in block 2\nsecond line")
        return 1.0

    worker.run_trials(study, url, 2, objective)
    failed, done = study.get_trials()
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_cause"] == "RuntimeError: shape mismatch in block 2"
    assert done.state == TrialState.COMPLETE and "fail_cause" not in done.user_attrs
    assert api.cycles(study)[0].reason == "RuntimeError: shape mismatch in block 2"
    assert "failed: cycle 1: RuntimeError: shape mismatch in block 2" in _status(capsys, path)


def test_status_shows_reference_baselines_when_the_study_has_them(tmp_path, capsys):
    path = write_study(tmp_path, n_trials=1)
    assert cli.main(["run", str(path)]) == 0
    db = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}")
    # computed when run created the study, shown with their own labels
    assert "reference baselines (val accuracy): majority class " in _status(capsys, path)
    db.set_user_attr("cycle_optuna_baselines", {
        "majority": {"label": "majority class", "val_accuracy": 0.5, "test_accuracy": 0.5},
        "1nn": {"label": "1-NN", "val_accuracy": 0.625, "test_accuracy": None}})
    assert "reference baselines (val accuracy): majority class 50.00%, 1-NN 62.50%" in _status(capsys, path)


# -- real faults on PostgreSQL ----------------------------------------------------------------------

def _running(url: str):
    return next((t for t in trials(url) if t.state == TrialState.RUNNING and t.intermediate_values), None)


@pytest.mark.postgres
def test_a_killed_workers_trial_shows_its_stored_cause(tmp_path: Path, pg_url: str, capsys):
    path = write_study(tmp_path, n_trials=1, epochs=4)
    victim = start_cli(["worker", str(path), "--storage", pg_url], pause=1.0)
    wait_for(lambda: _running(pg_url), 90, "a running trial with an epoch")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rescuer = start_cli(["worker", str(path), "--storage", pg_url])
    out, _ = rescuer.communicate(timeout=120)
    assert rescuer.returncode == 0, out
    lost = trials(pg_url)[0]
    assert lost.state == TrialState.FAIL
    cause = api.failure_cause(lost)  # "worker lost (host:pid, ...)" once the stale path writes it
    assert f"failed: cycle 1: {cause}" in _status(capsys, path, "--storage", pg_url)


@pytest.mark.postgres
@pytest.mark.pg_restarts
def test_a_database_restart_is_the_cause_of_the_trial_it_cut_off(tmp_path: Path, pg_url: str, capsys):
    path = write_study(tmp_path, n_trials=1, epochs=6)
    log = tmp_path / "worker.log"
    proc = start_cli(["worker", str(path), "--storage", pg_url], pause=1.0, log=log)
    wait_for(lambda: _running(pg_url), 90, "a running trial with an epoch")
    # down until the worker has noticed (a quick restart can fall between two of its writes)
    pg_cluster("stop", "-m", "fast")
    try:
        wait_for(lambda: "lost the database" in log.read_text(), 60, "the worker to notice")
    finally:
        pg_cluster("start")
    assert proc.wait(timeout=180) == 0, log.read_text()
    cut, retry = trials(pg_url)
    assert cut.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert cut.user_attrs["fail_cause"].startswith("storage lost mid-trial (OperationalError: ")
    text = _status(capsys, path, "--storage", pg_url)
    assert "failed: cycle 1: storage lost mid-trial (OperationalError" in text
    assert "1 of 1 trials finished" in text  # the retried failure does not count toward the total


def test_a_journal_trial_whose_local_worker_was_killed_shows_the_process_ended(tmp_path: Path, capsys):
    # a journal has no heartbeats: status showed "-" as if it ran, until a worker's check failed it
    path = write_study(tmp_path, n_trials=1, epochs=4)
    url = f"journal://{tmp_path / 'tiny.log'}"

    def jtrials():
        try:
            return api.load_study(path, url).get_trials(deepcopy=False)
        except Exception:  # noqa: BLE001 - not created yet
            return []

    victim = start_cli(["worker", str(path), "--storage", url], pause=1.0)
    wait_for(lambda: any(t.state == TrialState.RUNNING and t.intermediate_values for t in jtrials()), 90,
             "a running trial with an epoch")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    locks = sorted(p.name for p in tmp_path.rglob("*.lock"))
    (row,) = status.collect(api.load_study(path, url), 1).running
    assert row.alive is False and "process has ended" in status._ago(row.heartbeat_age, row.alive)
    assert "has" in _status(capsys, path, "--storage", url).split("last heartbeat")[1]  # wrapped in its cell
    assert sorted(p.name for p in tmp_path.rglob("*.lock")) == locks  # a reader removes no lock file
    victim = start_cli(["worker", str(path), "--storage", url], pause=1.0)  # a live one is not
    try:
        wait_for(lambda: any(t.state == TrialState.RUNNING and str(victim.pid) in str(t.user_attrs.get("worker"))
                             for t in jtrials()), 90, "the retry running")
        running = status.collect(api.load_study(path, url), 1).running
        assert [r.alive for r in running if str(victim.pid) in r.worker] == [True]
    finally:
        victim.kill()
        victim.wait()


def test_a_running_trial_past_the_grace_period_is_marked_as_lost(monkeypatch):
    from cycle_optuna import storage

    monkeypatch.setattr(storage, "GRACE_SECONDS", 30)
    monkeypatch.setattr(storage, "HEARTBEAT_SECONDS", 10)
    assert status._ago(5.2) == "5s ago"
    assert status._ago(40.0) == "40s ago: worker lost, retried by the next worker"


def test_a_worker_closes_with_the_total_another_worker_raised(tmp_path):
    study = write_study(tmp_path, n_trials=1, epochs=2)
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    first = start_cli(["worker", str(study)], pause=1.0, cwd=tmp_path)  # runs to the file's total, 1
    wait_for(lambda: any(t.state == TrialState.RUNNING for t in trials(url)), 90, "the first worker's trial")
    # what another worker's --n-trials 2 stores as it starts; here while the first trial surely runs
    # (a second worker's start-up can outlast it)
    totals.record(optuna.load_study(study_name="tiny", storage=url), 2)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    assert len(trials(url)) == 1  # its own total was 1: the raised one is for the worker that raised it
    assert "study tiny: 1 of 2 trials" in out  # the stored total, not the file's 1


def test_a_hand_back_cut_short_is_not_counted_as_finished(tmp_path):
    """Its retry is queued, the trial itself still RUNNING until a stale check fails it: neither
    has ended for good, so nothing is finished (not -1, as counting by subtraction gave)."""
    from cycle_optuna import storage

    study = optuna.create_study(study_name="s", storage=storage.open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    study.set_user_attr(api.CONFIG_ATTR, {})  # a study cycle-optuna made: the total is the file's
    study.ask().suggest_float("x", 0, 1)
    storage.queue_retry(study, study.get_trials(deepcopy=False)[0])
    s = status.collect(study, 1)
    assert s.states == {"RUNNING": 1, "WAITING": 1} and s.finished == 0
    assert status.render(s).renderables[0].title == "study s: 0 of 1 trials finished"


def _frozen(number: int, state: TrialState, start_ago: float, took: float | None = None, worker: str = "a"):
    from datetime import datetime, timedelta

    start = datetime.now() - timedelta(seconds=start_ago)
    return optuna.trial.FrozenTrial(
        number=number, state=state, value=1.0 if state == TrialState.COMPLETE else None, values=None,
        datetime_start=start, datetime_complete=None if took is None else start + timedelta(seconds=took),
        params={}, distributions={}, user_attrs={"worker": worker}, system_attrs={}, intermediate_values={},
        trial_id=number)


def test_the_time_left_is_the_mean_cycle_for_each_left_less_what_running_ones_ran_over_the_workers():
    ended = [_frozen(0, TrialState.COMPLETE, 500, 60), _frozen(1, TrialState.PRUNED, 400, 120)]  # mean 90 s
    one = status.pace([*ended, _frozen(2, TrialState.RUNNING, 30)], left=4)
    assert one.mean_s == pytest.approx(90) and one.workers == 1
    assert one.left_s == pytest.approx(4 * 90 - 30, abs=2)
    two = status.pace([*ended, _frozen(2, TrialState.RUNNING, 30), _frozen(3, TrialState.RUNNING, 500, worker="b")], left=4)
    assert two.workers == 2 and two.left_s == pytest.approx((4 * 90 - 30 - 90) / 2, abs=2)  # one ran past the mean
    assert status.pace(ended, left=4) is None  # no worker running: nothing moves
    assert status.pace(ended, left=4, workers=1).left_s == pytest.approx(360)  # `run` between two of its trials
    assert status.pace([_frozen(0, TrialState.RUNNING, 30)], left=4) is None  # nothing ended yet to go by


def test_status_says_how_long_the_rest_takes_while_a_worker_runs(tmp_path, capsys):
    study = write_study(tmp_path, n_trials=1)
    assert cli.main(["run", str(study)]) == 0
    db = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}")
    totals.record(db, 3)  # as `worker --n-trials 3` elsewhere would: 2 trials left
    assert "left at the pace so far" not in _status(capsys, study)  # idle study: no estimate
    running = db.ask()
    db._storage.set_trial_user_attr(running._trial_id, "worker", "host:1")
    out = _status(capsys, study)
    assert "left at the pace so far (" in out and "a cycle on average, 1 worker running)" in out, out


def test_a_running_trial_whose_worker_is_lost_is_no_worker_going_on(tmp_path, capsys, monkeypatch):
    from cycle_optuna import storage

    study = write_study(tmp_path, n_trials=1)
    assert cli.main(["run", str(study)]) == 0
    db = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}")
    totals.record(db, 3)
    running = db.ask()
    db._storage.set_trial_user_attr(running._trial_id, "worker", "host:1")
    db._storage.record_heartbeat(running._trial_id)
    assert "1 worker running)" in _status(capsys, study)
    monkeypatch.setattr(storage, "GRACE_SECONDS", 1)
    monkeypatch.setattr(storage, "HEARTBEAT_SECONDS", 1)  # the grace period: 2 s
    # its last beat is past the grace period: its worker is gone (the database's clock counts whole
    # seconds, so 3.5 s are at least 3 by it)
    time.sleep(3.5)
    out = _status(capsys, study)
    assert "left at the pace so far" not in out and "worker lost" in out, out
