"""Fault tolerance with real worker processes on the real PostgreSQL server: SIGKILL, restart, SIGTERM."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from optuna.trial import TrialState

from cycle_optuna.objective import RESUMED_ATTR
from conftest import pg_cluster
from workers_helpers import NetworkLink, ThrowawayPostgres, pg_proxy, running_with_checkpoint, start_cli, trials, wait_for, write_study

pytestmark = pytest.mark.postgres


def _running_with_checkpoint(url: str, tmp_path: Path):
    return running_with_checkpoint(trials(url), tmp_path)


def _both_took_a_trial(url: str) -> bool:
    return len({t.user_attrs["worker"] for t in trials(url) if "worker" in t.user_attrs}) == 2


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_killed_worker_trial_is_retried_from_its_checkpoint(tmp_path: Path, pg_url: str):
    study = write_study(tmp_path, n_trials=1, epochs=4)
    victim = start_cli(["worker", str(study), "--storage", pg_url], pause=1.0)
    hit = wait_for(lambda: _running_with_checkpoint(pg_url, tmp_path), 90, "a trial with an epoch checkpoint")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rescuer = start_cli(["worker", str(study), "--storage", pg_url])
    code, out = _finish(rescuer)
    assert code == 0, out
    assert "cycle 2 started on " in out and f"(retry of cycle {hit.number + 1})" in out  # one numbering
    ts = trials(pg_url)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.COMPLETE]
    retry = ts[1]
    assert retry.system_attrs["failed_trial"] == hit.number
    assert retry.params == ts[0].params
    assert retry.user_attrs[RESUMED_ATTR].startswith(f"trial {hit.number} epoch ")
    assert retry.user_attrs["epochs_run"] == 4
    # finished: the checkpoints are gone, only the best model stays
    leftovers = sorted(p.name for p in (tmp_path / "tiny-artifacts").iterdir())
    assert not [n for n in leftovers if n.startswith("checkpoint-")], leftovers


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.mark.pg_restarts
def test_database_restart_loses_no_finished_trial(tmp_path: Path, pg_url: str):
    study = write_study(tmp_path, n_trials=6, epochs=3)
    procs = [start_cli(["--debug", "worker", str(study), "--storage", pg_url], pause=0.3) for _ in range(2)]
    # both in their trial loop (one still starting up would exit 2 at the restart, as it should)
    wait_for(lambda: _both_took_a_trial(pg_url) and sum(t.state in FINISHED for t in trials(pg_url)) >= 1, 120,
             "a finished trial, both workers in their loop")
    before = {t.number: (t.state, t.value) for t in trials(pg_url) if t.state in FINISHED}
    pg_cluster("restart")
    results = [_finish(p, timeout=180) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    ts = trials(pg_url)
    after = {t.number: (t.state, t.value) for t in ts if t.state in FINISHED}
    assert before.items() <= after.items()  # nothing finished was lost or changed
    assert len(after) == 6  # the cap, met exactly (the default median pruner may prune some)
    retried = [t for t in ts if t.state == TrialState.FAIL]
    assert len(retried) <= 2  # at most the in-flight trials
    assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.pg_restarts
def test_worker_started_while_the_database_is_down_waits_for_it_when_asked(tmp_path: Path, pg_url: str):
    study = write_study(tmp_path, n_trials=2, epochs=1)
    pg_cluster("stop")
    try:
        # without the flag: one line naming the storage, exit 2, at once
        rc, out = _finish(start_cli(["worker", str(study), "--storage", pg_url]), timeout=60)
        assert rc == 2, out
        assert "cannot open storage" in out and "waiting" not in out
        log = tmp_path / "worker.log"
        proc = start_cli(["worker", str(study), "--storage", pg_url, "--wait-for-storage", "120"], log=log)
        wait_for(lambda: "waiting up to 120s for the database at" in log.read_text() or proc.poll() is not None,
                 60, "the worker saying it waits")
        assert proc.poll() is None, log.read_text()  # still waiting, not gone
    finally:
        pg_cluster("start")
    rc = proc.wait(timeout=180)
    text = log.read_text()
    assert rc == 0, text
    assert "answers" in text
    ts = trials(pg_url)
    assert len(ts) == 2 and all(t.state in FINISHED for t in ts), ts


def test_waiting_for_the_database_does_not_wait_on_a_missing_database(tmp_path: Path, pg_url: str):
    study = write_study(tmp_path)
    missing = pg_url.rsplit("/", 1)[0] + "/cycle_test_no_such_database"
    rc, out = _finish(start_cli(["worker", str(study), "--storage", missing, "--wait-for-storage", "120"]), timeout=100)
    assert rc == 2, out
    assert "does not exist" in out and "waiting" not in out  # a wrong name is reported, not waited on


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_worker_hands_its_trial_back(tmp_path: Path, pg_url: str, sig, code):
    study = write_study(tmp_path, n_trials=1, epochs=4)
    proc = start_cli(["worker", str(study), "--storage", pg_url], pause=1.0)
    hit = wait_for(lambda: _running_with_checkpoint(pg_url, tmp_path), 90, "a trial with an epoch checkpoint")
    proc.send_signal(sig)
    rc, out = _finish(proc, timeout=60)
    assert rc == code, out
    assert "interrupted: worker" in out and f"handed back cycle {hit.number + 1}" in out
    ts = trials(pg_url)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.WAITING]  # no RUNNING zombie
    rc, out = _finish(start_cli(["worker", str(study), "--storage", pg_url]))
    assert rc == 0, out
    done = trials(pg_url)[1]
    assert done.state == TrialState.COMPLETE and done.user_attrs[RESUMED_ATTR].startswith(f"trial {hit.number}")


# ---------------------------------------------------------------------------------------------
# Faults in the window between creating a trial and its first heartbeat, swallowed signals,
# database outages, a full artifact store: each with real worker processes.
# ---------------------------------------------------------------------------------------------

import os  # noqa: E402
import sys  # noqa: E402

from cycle_optuna import storage  # noqa: E402
from workers_helpers import ROOT, worker_env  # noqa: E402,F401

# The real CLI after `prelude` (Python run in the worker process first: a fault to inject).
_WITH = "import sys\n{prelude}\nfrom cycle_optuna.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _start(args: list[str], log: Path, *, prelude: str = "", prefix: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "-c", _WITH.format(prelude=prelude), *args], env=worker_env(**env),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


def _log_says(log: Path, words: str):
    return lambda: words in log.read_text()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tiny.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def _checkpoint_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "tiny-artifacts").glob("checkpoint-*"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_worker_stopped_between_creating_a_trial_and_its_first_beat_leaves_no_stuck_trial(
        tmp_path: Path, url: str, sig):
    study = write_study(tmp_path, n_trials=2, epochs=1)
    log = tmp_path / "victim.log"
    victim = _start(["worker", str(study), "--storage", url], log, CYCLE_OPTUNA_TEST_PAUSE_AFTER_ASK="60")
    wait_for(_log_says(log, "paused after ask"), 90, "the worker to create a trial")
    (orphan,) = trials(url)
    assert orphan.state == TrialState.RUNNING and storage.WORKER_ATTR not in orphan.user_attrs  # no beat yet
    victim.send_signal(sig)
    victim.wait(timeout=60)
    rescuer = start_cli(["worker", str(study), "--storage", url])
    code, out = _finish(rescuer)
    assert code == 0, out
    ts = trials(url)
    assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)], [t.state for t in ts]
    assert sum(t.state == TrialState.COMPLETE for t in ts) == 2  # the cap, with the orphan's slot retried
    first = ts[0]
    assert first.state == TrialState.FAIL
    if sig == signal.SIGKILL:  # found by the sweep
        assert first.user_attrs["fail_cause"].startswith("worker lost (")
        assert "last heartbeat 20" in first.user_attrs["fail_cause"]
    else:  # handed back by the worker itself
        assert victim.returncode == 143, log.read_text()
        assert first.user_attrs["fail_cause"].startswith("worker interrupted (")
    assert any(t.system_attrs.get("failed_trial") == first.number for t in ts)


_SWALLOW = (
    # a cleanup callback that swallows the interrupt raised in it (as SQLAlchemy's may), then hangs
    "import time, cycle_optuna.objective as o\n"
    "save = o.TrialCheckpoints.save\n"
    "def swallowing(self, epoch, state):\n"
    "    save(self, epoch, state)\n"
    "    try:\n"
    # after the second save (the "checkpoint 1" the tests wait for) the worker waits here for their
    # signal, which cuts the wait short
    "        print('checkpoint', epoch, flush=True); time.sleep(60 if epoch == 1 else 1.0)\n"
    "    except KeyboardInterrupt:\n"
    "        print('swallowed', flush=True)\n"
    "        {after}\n"
    "o.TrialCheckpoints.save = swallowing\n"
)


def test_a_swallowed_sigterm_still_stops_the_worker(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=3, epochs=6)
    log = tmp_path / "w.log"
    proc = _start(["worker", str(study)], log, prelude=_SWALLOW.format(after="pass"))
    wait_for(_log_says(log, "checkpoint 1"), 90, "a trial under way")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, log.read_text()
    text = log.read_text()
    assert "swallowed" in text and "handed back cycle 1" in text
    assert [t.state for t in trials(url)] == [TrialState.FAIL, TrialState.WAITING]  # not the whole study


def test_a_second_signal_stops_the_worker_at_once(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=1, epochs=6)
    log = tmp_path / "w.log"
    proc = _start(["worker", str(study)], log, prelude=_SWALLOW.format(after="time.sleep(600)"))
    wait_for(_log_says(log, "checkpoint 1"), 90, "a trial under way")
    proc.send_signal(signal.SIGTERM)
    wait_for(_log_says(log, "swallowed"), 30, "the first signal")  # now stuck in the cleanup
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert "second SIGINT: stopping now" in log.read_text()
    # the trial it left running is recovered like a killed worker's
    code, out = _finish(start_cli(["worker", str(study)]))
    assert code == 0, out
    assert [t.state for t in trials(url)] == [TrialState.FAIL, TrialState.COMPLETE]


_IN_C = (
    # after the first checkpoint, one long call in C that never returns to Python (as a huge
    # PyTorch kernel would not for minutes): key stretching far longer than the test, in C
    "import hashlib, cycle_optuna.objective as o\n"
    "save = o.TrialCheckpoints.save\n"
    "def stuck(self, epoch, state):\n"
    "    save(self, epoch, state)\n"
    "    print('in C', flush=True)\n"
    "    hashlib.pbkdf2_hmac('sha256', b'key', b'salt', 2**31 - 1)\n"
    "o.TrialCheckpoints.save = stuck\n"
)


def test_a_second_signal_stops_a_worker_stuck_in_one_long_call(tmp_path: Path):
    study = write_study(tmp_path, n_trials=1, epochs=3)
    log = tmp_path / "w.log"
    proc = _start(["worker", str(study)], log, prelude=_IN_C)
    try:
        wait_for(_log_says(log, "in C"), 90, "the worker inside the long call")
        proc.send_signal(signal.SIGTERM)  # its handler waits for the call to return
        # seen before the second is sent: two signals sent at once to a process the loaded machine
        # has not run in between arrive as one (standard signals do not queue)
        wait_for(_log_says(log, "SIGTERM: handing back the running trial(s)"), 30, "the first signal seen")
        assert proc.poll() is None  # still inside the call
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
    assert "second SIGTERM: stopping now" in log.read_text()


def test_a_second_signal_in_the_middle_of_the_hand_back_loses_no_trial(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=1, epochs=4)
    log = tmp_path / "w.log"
    proc = start_cli(["worker", str(study)], pause=1.0, log=log,
                     env=worker_env(CYCLE_OPTUNA_TEST_PAUSE_HANDING_BACK="60"))
    hit = wait_for(lambda: _running_with_checkpoint(url, tmp_path), 90, "a trial with an epoch checkpoint")
    proc.send_signal(signal.SIGTERM)
    wait_for(_log_says(log, "paused handing back"), 30, "the hand-back under way")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert "second SIGTERM: stopping now" in log.read_text()
    # cut off between queuing the retry and failing the trial: the next worker fails it as a killed
    # worker's and runs the queued retry, without queuing a second one
    code, out = _finish(start_cli(["worker", str(study)]))
    assert code == 0, out
    ts = trials(url)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.COMPLETE]
    assert ts[1].user_attrs[RESUMED_ATTR].startswith(f"trial {hit.number} epoch ")


def test_a_worker_killed_while_failing_a_lost_trial_leaves_its_retry_to_the_next(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=1, epochs=4)
    victim = start_cli(["worker", str(study)], pause=1.0)
    hit = wait_for(lambda: _running_with_checkpoint(url, tmp_path), 90, "a trial with an epoch checkpoint")
    victim.kill()
    victim.wait()
    log = tmp_path / "rescuer.log"
    rescuer = _start(["worker", str(study)], log, CYCLE_OPTUNA_TEST_PAUSE_FAILING_LOST="60")
    wait_for(_log_says(log, "paused failing lost"), 90, "the rescuer to fail the lost trial")
    assert [t.state for t in trials(url)] == [TrialState.FAIL]  # failed, its retry not queued yet
    rescuer.kill()
    rescuer.wait()
    code, out = _finish(start_cli(["worker", str(study)]))
    assert code == 0, out
    lost, retry = trials(url)
    assert lost.state == TrialState.FAIL and lost.user_attrs["fail_cause"].startswith("worker lost (")
    assert retry.state == TrialState.COMPLETE and retry.system_attrs["failed_trial"] == hit.number
    assert retry.user_attrs[RESUMED_ATTR].startswith(f"trial {hit.number} epoch ")
    assert "fail_cause" not in retry.user_attrs


def _stop_outside_a_write(proc: subprocess.Popen, db: Path) -> None:
    """SIGSTOP, at a moment the process holds neither the database's write lock (its heartbeat
    thread writes every second) nor the workers' cap lock: frozen inside one, it would stall the
    other worker rather than the test's own fault."""
    import fcntl
    import sqlite3
    import time

    for _ in range(100):
        proc.send_signal(signal.SIGSTOP)
        conn = sqlite3.connect(db, timeout=0.2, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            for lock in db.parent.glob(f"{db.name}-*.lock"):
                with open(lock, "a") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
            return
        except (sqlite3.OperationalError, BlockingIOError):
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        finally:
            conn.close()
    raise AssertionError("the worker held a lock at every try")


def test_a_worker_paused_past_the_grace_period_carries_on_after_its_trial_was_taken_over(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=2, epochs=4)
    log = tmp_path / "paused.log"
    paused = start_cli(["worker", str(study)], pause=1.0, log=log)
    hit = wait_for(lambda: _running_with_checkpoint(url, tmp_path), 90, "a trial with an epoch checkpoint")
    _stop_outside_a_write(paused, tmp_path / "tiny.db")
    try:
        other = start_cli(["worker", str(study)])
        wait_for(lambda: trials(url)[hit.number].state == TrialState.FAIL, 90, "its trial failed as stale")
    finally:
        paused.send_signal(signal.SIGCONT)
    assert paused.wait(timeout=120) == 0, log.read_text()
    text = log.read_text()
    assert f"cycle {hit.number + 1} was taken over: another worker failed it as stale" in text
    assert "Traceback" not in text and "Cannot tell" not in text
    code, out = _finish(other)
    assert code == 0, out
    ts = trials(url)
    assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(t.state == TrialState.COMPLETE for t in ts) == 2  # the cap, the taken-over trial retried
    assert any(t.system_attrs.get("failed_trial") == hit.number and t.state == TrialState.COMPLETE for t in ts)


def test_a_hand_back_racing_a_stale_check_queues_one_retry(tmp_path: Path):
    """A worker frozen past the grace period is failed as stale by another, which is cut off just
    before queuing the retry; the frozen worker, thawed and stopped, hands its trial back at that
    moment. Both found no retry queued; only one may queue it."""
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=1, epochs=6)
    frozen_log, checker_log = tmp_path / "frozen.log", tmp_path / "checker.log"
    frozen = start_cli(["worker", str(study)], pause=1.0, log=frozen_log)
    hit = wait_for(lambda: _running_with_checkpoint(url, tmp_path), 90, "a trial with an epoch checkpoint")
    _stop_outside_a_write(frozen, tmp_path / "tiny.db")
    try:
        checker = _start(["worker", str(study)], checker_log, CYCLE_OPTUNA_TEST_PAUSE_FAILING_LOST="10")
        wait_for(_log_says(checker_log, "paused failing lost"), 90, "the other worker to fail the trial as stale")
    finally:
        frozen.send_signal(signal.SIGCONT)
    frozen.send_signal(signal.SIGTERM)  # its hand-back runs while the checker is paused
    assert frozen.wait(timeout=120) == 143, frozen_log.read_text()
    assert checker.wait(timeout=120) == 0, checker_log.read_text()
    ts = trials(url)
    retries = [t for t in ts if hit.number in t.system_attrs.get("retry_history", ())]
    assert len(retries) == 1, [(t.number, t.state, t.system_attrs) for t in ts]
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.COMPLETE]


def test_a_kill_before_the_result_is_stored_keeps_the_checkpoint_for_the_retry(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=1, epochs=3)
    log = tmp_path / "w.log"
    die_at_tell = "import os, cycle_optuna.optuna_internals as i\ni.tell = lambda *a, **k: os._exit(9)\n"
    assert _start(["worker", str(study)], log, prelude=die_at_tell).wait(timeout=120) == 9, log.read_text()
    code, out = _finish(start_cli(["worker", str(study)]))
    assert code == 0, out
    dead, retry = trials(url)
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.user_attrs[RESUMED_ATTR] == "trial 0 epoch 3"  # trained, not from scratch
    assert not _checkpoint_files(tmp_path)
    # the three epochs were trained once, by the killed cycle: the retry only stored their result
    from cycle_optuna import api, report, report_markdown

    assert [(c.epochs_run, c.epochs_trained) for c in api.cycles("tiny", url)] == [(3, 3), (3, 0)]
    assert ": 3 epochs trained" in report_markdown.render(report.analyse("tiny", url, test=False))


def test_a_trial_out_of_retries_leaves_no_checkpoint(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=1, epochs=3)
    no_retries = "import cycle_optuna.storage as s\ns.MAX_RETRY = 0\n"
    die = no_retries + _SWALLOW.format(after="pass").replace("time.sleep(60 if epoch == 1 else 1.0)", "import os; os._exit(9)")
    log = tmp_path / "w.log"
    assert _start(["worker", str(study)], log, prelude=die).wait(timeout=120) == 9, log.read_text()
    assert _checkpoint_files(tmp_path)  # the dead trial's checkpoint is there
    assert _start(["worker", str(study)], tmp_path / "r.log", prelude=no_retries).wait(timeout=120) == 0
    (dead,) = trials(url)
    assert dead.state == TrialState.FAIL and dead.user_attrs["fail_cause"].startswith("worker lost (")
    assert not _checkpoint_files(tmp_path)
    assert not list((tmp_path / "tiny-artifacts").iterdir())


_FULL_DISK = (
    # the artifact store's disk is full: a file is created, then writing into it fails
    "import errno, cycle_optuna.storage as s\n"
    "def full(src, dst, *a, **k):\n"
    "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
    "s.shutil.copyfileobj = full\n"
)


def test_a_full_artifact_store_loses_no_best_model_and_leaves_no_file(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=2, epochs=2)
    log = tmp_path / "w.log"
    assert _start(["worker", str(study)], log, prelude=_FULL_DISK).wait(timeout=180) == 0, log.read_text()
    text = log.read_text()
    ts = trials(url)
    # a new best whose model cannot be stored does not complete as a best without a model
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.FAIL]
    for t in ts:
        assert t.user_attrs["fail_cause"].startswith("ModelNotSaved: model of trial")
        assert "No space left on device" in t.user_attrs["fail_cause"] and "unsaved_val_loss" in t.user_attrs
        assert f"cycle {t.number + 1} (trial {t.number}): epoch checkpoint not saved: No space left on device" in text
    assert "Traceback" not in text  # each fault is one line
    assert not list((tmp_path / "tiny-artifacts").iterdir())  # no empty or partial file
    rc = subprocess.run([sys.executable, "-m", "cycle_optuna.cli", "best", str(study), "--no-test"],
                        env=worker_env(), capture_output=True, text=True)
    assert rc.returncode == 2


@pytest.mark.pg_restarts
def test_a_database_outage_is_one_line_and_the_cut_off_trial_is_handed_back_by_its_worker(
        tmp_path: Path, pg_url: str):
    study = write_study(tmp_path, n_trials=3, epochs=8)
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    # a grace period far longer than the test: only a worker's own hand-back can retry a trial
    procs = [start_cli(["worker", str(study), "--storage", pg_url], pause=0.3, log=log,
                       env=worker_env(CYCLE_OPTUNA_GRACE_SECONDS="600")) for log in logs]
    wait_for(lambda: _both_took_a_trial(pg_url) and _running_with_checkpoint(pg_url, tmp_path), 120,
             "a trial under way, both workers in their loop")
    pg_cluster("stop", "-m", "fast")
    try:
        wait_for(lambda: any("lost the database" in log.read_text() for log in logs), 60, "a worker to notice")
    finally:
        pg_cluster("start")
    assert [p.wait(timeout=240) for p in procs] == [0, 0], [log.read_text() for log in logs]
    text = "".join(log.read_text() for log in logs)
    assert "exceeding max length" not in text and "Traceback" not in text
    assert "database back after" in text
    ts = trials(pg_url)
    assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(t.state == TrialState.COMPLETE for t in ts) == 3
    failed = [t for t in ts if t.state == TrialState.FAIL]
    assert failed and all(t.user_attrs["fail_cause"].startswith("storage lost mid-trial (") for t in failed)


def test_a_database_host_gone_without_a_word_is_a_lost_database_not_a_hang(tmp_path: Path, pg_url: str):
    """The worker's network to PostgreSQL is cut with no reset or refusal (a host down, a cable
    pulled): every packet dropped. libpq waited on its query until TCP gave up (about 15 minutes;
    2 hours on an idle connection); bounded by $CYCLE_OPTUNA_PG_TIMEOUT_SECONDS, the worker calls
    the database lost, waits for it, and hands its cut-off trial back once the link is mended."""
    study = write_study(tmp_path, n_trials=2, epochs=8)
    log = tmp_path / "w.log"
    with NetworkLink(pg_url) as link:
        # a grace period far longer than the test: only the worker's own hand-back can retry a trial
        env = worker_env(CYCLE_OPTUNA_PG_TIMEOUT_SECONDS="4", CYCLE_OPTUNA_GRACE_SECONDS="600")
        proc = start_cli(["worker", str(study), "--storage", link.url], pause=0.3, log=log, env=env, prefix=link.prefix)
        try:
            hit = wait_for(lambda: _running_with_checkpoint(pg_url, tmp_path) or proc.poll() is not None, 120,
                           "a trial with an epoch checkpoint")
            assert proc.poll() is None, log.read_text()
            link.cut()
            try:
                wait_for(lambda: "lost the database" in log.read_text() or proc.poll() is not None, 60,
                         "the worker to notice")
            finally:
                link.mend()
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert rc == 0, text
    assert "Traceback" not in text and "database back after" in text, text
    ts = trials(pg_url)
    assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)], ts
    assert sum(t.state == TrialState.COMPLETE for t in ts) == 2
    failed = [t for t in ts if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [hit.number], ts
    assert failed[0].user_attrs["fail_cause"].startswith("storage lost mid-trial ("), failed[0].user_attrs


def test_a_worker_gone_without_a_word_while_it_holds_the_study_lock_holds_up_no_other_worker(tmp_path: Path):
    """A worker's host goes down while it holds the study's lock (taken to count and create a
    trial). The server kept its session, and so the lock, until its own TCP gave up: 2 hours by
    default, every other worker waiting at the lock. Each session now has the server probe the
    worker ($CYCLE_OPTUNA_PG_TIMEOUT_SECONDS): the session ends and another worker takes the lock.
    A server of its own, so that its sockets cross the cut link."""
    study = write_study(tmp_path, n_trials=1, epochs=1)
    with NetworkLink(None) as link, ThrowawayPostgres(listen=link.outer_ip) as server:
        held, other = tmp_path / "held.log", tmp_path / "other.log"
        gated = _GATED.format(name="_count_and_waiting", gate=str(tmp_path / "never"))
        gone = _start(["worker", str(study), "--storage", server.url], held, prelude=gated, prefix=link.prefix,
                      CYCLE_OPTUNA_PG_TIMEOUT_SECONDS="4")
        try:
            wait_for(lambda: "at _count_and_waiting" in held.read_text() or gone.poll() is not None, 90,
                     "the worker to hold the study's lock")
            assert gone.poll() is None, held.read_text()
            link.cut()
            proc = _start(["worker", str(study), "--storage", server.socket_url], other)
            try:
                rc = proc.wait(timeout=90)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert rc == 0, other.read_text()
            ts = trials(server.socket_url)
            assert [t.state for t in ts] == [TrialState.COMPLETE], ts
        finally:
            gone.kill()
            gone.wait()


@pytest.fixture
def mariadb_url():
    """A new, empty database on the local MariaDB (127.0.0.1:3306, root), dropped after the test;
    skipped saying why where none answers."""
    import uuid

    import sqlalchemy

    pytest.importorskip("pymysql")
    admin = sqlalchemy.create_engine("mysql+pymysql://root@127.0.0.1:3306/")
    name = f"cycle_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as c:
            c.exec_driver_sql(f"CREATE DATABASE {name}")
    except sqlalchemy.exc.SQLAlchemyError as e:
        admin.dispose()
        pytest.skip(f"MariaDB not usable on 127.0.0.1:3306: {str(e).splitlines()[0]}")
    yield f"mysql+pymysql://root@127.0.0.1:3306/{name}"
    with admin.connect() as c:
        c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
    admin.dispose()


def test_a_mariadb_worker_silent_inside_the_study_lock_holds_up_no_other_worker(tmp_path: Path, mariadb_url: str):
    """MySQL/MariaDB has no keepalive setting per session: a worker whose host vanished while it held
    the study's lock (GET_LOCK) kept it until the server's wait_timeout, 8 hours by default. The
    lock's session now has an idle limit of its own (storage.MYSQL_LOCK_IDLE_S, 3 s here): another
    worker finishes the study, and the silent one, woken, finds its session closed, rides that out as
    a lost database and stops with the cap kept (its host gone, the server's view is the same: a
    session that sends nothing)."""
    study = write_study(tmp_path, n_trials=2, epochs=1)
    held, other, gate = tmp_path / "held.log", tmp_path / "other.log", tmp_path / "gate"
    prelude = ("import cycle_optuna.storage as s\ns.MYSQL_LOCK_IDLE_S = 3\n"
               + _GATED.format(name="_count_and_waiting", gate=str(gate)))
    silent = _start(["worker", str(study), "--storage", mariadb_url], held, prelude=prelude)
    try:
        wait_for(lambda: "at _count_and_waiting" in held.read_text() or silent.poll() is not None, 90,
                 "the worker to hold the study's lock")
        assert silent.poll() is None, held.read_text()
        second = start_cli(["worker", str(study), "--storage", mariadb_url])
        try:
            rc, out = _finish(second, timeout=90)
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
        assert rc == 0, out
        assert [t.state for t in trials(mariadb_url)] == [TrialState.COMPLETE] * 2, out
        gate.touch()
        assert silent.wait(timeout=90) == 0, held.read_text()
    finally:
        if silent.poll() is None:
            silent.kill()
            silent.wait()
    text = held.read_text()
    assert "lost the database" in text and "Traceback" not in text, text
    assert [t.state for t in trials(mariadb_url)] == [TrialState.COMPLETE] * 2  # the cap held


def test_postgresql_connections_bound_a_silent_network_on_both_ends_and_the_urls_own_settings_win(pg_url: str):
    engine = lambda url: storage._unwrap(storage.open_storage(url)).engine  # noqa: E731
    with engine(pg_url).connect() as c:
        params = c.connection.dbapi_connection.info.get_parameters()
        server = {k: c.exec_driver_sql(f"SHOW {k}").scalar()
                  for k in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout")}
    assert params["keepalives"] == "1" and params["tcp_user_timeout"] == "60000", params
    assert int(params["keepalives_idle"]) + 3 * int(params["keepalives_interval"]) <= 60, params
    # the server probes this end the same way (a session of a worker gone without a word ends)
    assert server["tcp_user_timeout"] == "60000" and server["tcp_keepalives_count"] == "3", server
    assert int(server["tcp_keepalives_idle"]) + 3 * int(server["tcp_keepalives_interval"]) <= 60, server
    with engine(pg_url + "?tcp_user_timeout=5000&keepalives_idle=7").connect() as c:
        params = c.connection.dbapi_connection.info.get_parameters()
    assert params["tcp_user_timeout"] == "5000" and params["keepalives_idle"] == "7", params


@pytest.mark.pg_restarts
def test_a_signal_while_the_database_is_away_stops_the_worker_with_its_code_not_a_traceback(
        tmp_path: Path, pg_url: str):
    # its hand-back cannot be stored: that was a StorageInternalError traceback and exit 1
    study = write_study(tmp_path, n_trials=1, epochs=8)
    log = tmp_path / "w.log"
    proc = start_cli(["worker", str(study), "--storage", pg_url], pause=0.3, log=log)
    hit = wait_for(lambda: _running_with_checkpoint(pg_url, tmp_path), 120, "a trial with an epoch checkpoint")
    pg_cluster("stop", "-m", "fast")
    try:
        wait_for(lambda: "lost the database" in log.read_text(), 60, "the worker to notice")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        pg_cluster("start")
    text = log.read_text()
    assert rc == 143, text
    assert "Traceback" not in text and "unexpected error" not in text
    assert f"cycle {hit.number + 1} (trial {hit.number}) could not be handed back" in text
    # still running in the database, its heartbeat stopped: the next worker fails it as stale and retries it
    rc, out = _finish(start_cli(["worker", str(study), "--storage", pg_url]))
    assert rc == 0, out
    ts = trials(pg_url)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.COMPLETE], out
    assert ts[1].user_attrs[RESUMED_ATTR].startswith(f"trial {hit.number}")


@pytest.mark.pg_restarts
def test_a_worker_whose_time_limit_comes_while_the_database_is_away_stops_at_it(tmp_path: Path, pg_url: str):
    """`--timeout` is a wall-time (a batch job's, an evening's): a worker waiting for its database does
    not wait past it (it waited the full 300 s reconnect window), and says what became of its trial."""
    study = write_study(tmp_path, n_trials=1, epochs=60)
    log = tmp_path / "w.log"
    proc = start_cli(["worker", str(study), "--storage", pg_url, "--timeout", "30"], pause=1.0, log=log)
    try:
        hit = wait_for(lambda: _running_with_checkpoint(pg_url, tmp_path), 120, "a trial with an epoch checkpoint")
        pg_cluster("stop", "-m", "fast")
        try:
            rc = proc.wait(timeout=240)  # the deadline is at most 30 s away; the reconnect window 300 s
        finally:
            pg_cluster("start")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert rc == 2, text
    assert "error: time limit reached (--timeout) while the storage" in text and "Traceback" not in text, text
    assert f"cycle {hit.number + 1} (trial {hit.number}) could not be handed back" in text, text
    assert "for 300s" not in text
    # left running with its heartbeat stopped, for a later worker's stale check to retry
    assert [t.state for t in trials(pg_url)] == [TrialState.RUNNING]


def test_a_signal_while_the_sqlite_disk_is_full_stops_the_worker_with_its_code(tmp_path: Path):
    # the full disk reads as a lost database; a SIGTERM during that wait tried the hand-back, whose
    # write failed too: a StorageInternalError traceback and exit 1
    from workers_helpers import fill_disk, small_tmpfs

    study = write_study(tmp_path, n_trials=1, epochs=8)
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        url = f"sqlite:///{disk / 'tiny.db'}"
        log = tmp_path / "w.log"
        proc = start_cli(["worker", str(study), "--storage", url], pause=0.3, log=log)
        hit = wait_for(lambda: running_with_checkpoint(trials(url), tmp_path), 120, "a trial with an epoch checkpoint")
        filler = fill_disk(disk)
        wait_for(lambda: "lost the database" in log.read_text() or proc.poll() is not None, 60, "the worker to notice")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        text = log.read_text()
        assert rc == 143, text
        assert "Traceback" not in text and "unexpected error" not in text
        assert f"free space on the disk of {disk / 'tiny.db'}" in text
        assert f"cycle {hit.number + 1} (trial {hit.number}) could not be handed back" in text
        filler.unlink()
        rc, out = _finish(start_cli(["worker", str(study), "--storage", url]))
        assert rc == 0, out
        ts = trials(url)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.COMPLETE], out


def test_a_kill_after_the_result_is_stored_leaves_no_checkpoint_behind(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=2, epochs=2)
    die_after_tell = "import os, cycle_optuna.objective as o\no.Objective.trial_ended = lambda self, n: os._exit(9)\n"
    assert _start(["worker", str(study)], tmp_path / "w.log", prelude=die_after_tell).wait(timeout=120) == 9
    assert [t.state for t in trials(url)] == [TrialState.COMPLETE]
    assert _checkpoint_files(tmp_path)  # its checkpoint outlived it
    code, out = _finish(start_cli(["worker", str(study)]))
    assert code == 0, out
    assert [t.state for t in trials(url)] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert not _checkpoint_files(tmp_path)


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run_with_a_paused_worker(tmp_path: Path, *, nohup: bool = False, **pauses: str,
                              ) -> tuple[str, subprocess.Popen, list[int], list[Path]]:
    """`run --workers 2` on a 4-trial study, once one of its workers holds a trial it has just asked
    for (the other waits for the lock it asks under): (storage URL, run, worker pids, [its log])."""
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=4, epochs=1)
    env = worker_env(CYCLE_OPTUNA_TEST_PAUSE_AFTER_ASK="120", **pauses)
    run = start_cli(["run", str(study), "--workers", "2"], env=env, nohup=nohup)
    logs = [tmp_path / f"tiny-worker-{i}.log" for i in (1, 2)]
    paused = wait_for(lambda: [p for p in logs if p.exists() and "paused after ask" in p.read_text()], 120,
                      "a worker paused with a trial")
    workers = _children(run.pid)
    assert len(workers) == 2
    return url, run, workers, paused


@pytest.mark.parametrize("nohup", [False, True], ids=["plain", "nohup"])
def test_workers_of_a_run_killed_by_kill_9_stop_and_hand_their_trials_back(tmp_path: Path, nohup: bool):
    """`run --workers K` killed with -9 cannot stop its workers: they ask Linux for a SIGHUP when
    their parent dies, and hand back their trials instead of training on unseen; also when `run` was
    started with SIGHUP ignored (nohup): the workers, with no terminal of their own, still hear it."""
    url, run, workers, paused = _run_with_a_paused_worker(tmp_path, nohup=nohup)
    run.kill()
    run.wait()
    wait_for(lambda: not any(_alive(p) for p in workers), 60, "the workers to stop with their parent")
    states = [t.state for t in trials(url)]
    logs = "\n".join(f"--- {p.name}:\n{p.read_text()}" for p in sorted(tmp_path.glob("*-worker-*.log")))
    assert states and TrialState.RUNNING not in states, f"{states}\n{logs}"  # handed back
    text = paused[0].read_text()
    assert "SIGHUP (the terminal closed, or the run that started this process ended)" in text and "stopping now" not in text, text


@pytest.mark.parametrize("again, code", [(signal.SIGHUP, 129), (signal.SIGTERM, 143)])
def test_a_repeated_parent_death_signal_lets_the_hand_back_finish(tmp_path: Path, again, code):
    """Linux repeats the parent-death SIGHUP as each thread of a killed `run` exits: a repeat
    arriving mid-hand-back changes nothing, while a SIGTERM after it still stops the worker at once."""
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=1, epochs=4)
    log = tmp_path / "w.log"
    # paused long enough for the second signal to arrive within the pause, which it does not cut short
    proc = start_cli(["worker", str(study)], pause=1.0, log=log,
                     env=worker_env(CYCLE_OPTUNA_TEST_PAUSE_HANDING_BACK="10"))
    wait_for(lambda: _running_with_checkpoint(url, tmp_path), 90, "a trial with an epoch checkpoint")
    proc.send_signal(signal.SIGHUP)
    wait_for(_log_says(log, "paused handing back"), 30, "the hand-back under way")
    proc.send_signal(again)
    assert proc.wait(timeout=45) == code, log.read_text()
    text = log.read_text()
    if again == signal.SIGHUP:
        assert "stopping now" not in text and "handed back cycle 1" in text, text
        assert [t.state for t in trials(url)] == [TrialState.FAIL, TrialState.WAITING]
    else:
        assert "second SIGTERM: stopping now" in text, text
        assert [t.state for t in trials(url)] == [TrialState.RUNNING, TrialState.WAITING]  # the next worker's


def test_a_worker_started_under_nohup_trains_on_through_a_hangup(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=1, epochs=4)
    log = tmp_path / "w.log"
    proc = start_cli(["worker", str(study)], pause=1.0, log=log, nohup=True)
    wait_for(lambda: _running_with_checkpoint(url, tmp_path), 90, "a trial with an epoch checkpoint")
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=90) == 0, log.read_text()
    assert [t.state for t in trials(url)] == [TrialState.COMPLETE]


class _Terminal:
    """`cycle-optuna ARGS` (epochs slowed by `pause`) on a pseudo-terminal of its own, read as it
    writes; `hang_up` closes the terminal, as closing its window does."""

    def __init__(self, args: list[str], *, pause: float, env: dict[str, str]) -> None:
        import pty
        import threading

        from workers_helpers import SLOW_EPOCHS

        argv = [sys.executable, "-c", SLOW_EPOCHS.format(pause=pause), *args]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its session's leader, with the terminal as its own
            try:
                signal.signal(signal.SIGHUP, signal.SIG_DFL)  # whatever the test runner was started with
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.out: list[bytes] = []
        self.stop = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        import select

        while not self.stop.is_set():
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    self.out.append(os.read(self.fd, 65536))
                except OSError:
                    return

    def text(self) -> str:
        return b"".join(self.out).decode(errors="replace")

    def hang_up(self) -> None:
        self.stop.set()
        self.reader.join()
        os.close(self.fd)

    def wait(self, timeout: float) -> int:
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"still running {timeout}s after its terminal closed")


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["run", "run-workers"])
def test_closing_the_terminal_of_run_hands_its_trials_back(tmp_path: Path, workers: list[str]):
    """Its terminal gone, `run` hands the running trials back (`run --workers`: its workers do) and
    ends 129 (SIGHUP), saying nothing: every write to the closed terminal fails."""
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=2, epochs=6)
    if workers:  # the workers are processes of their own, at full speed: one pauses with its trial
        env = worker_env(CYCLE_OPTUNA_TEST_PAUSE_AFTER_ASK="120")
        logs = [tmp_path / f"tiny-worker-{i}.log" for i in (1, 2)]
        ready = lambda: any(p.exists() and "paused after ask" in p.read_text() for p in logs)  # noqa: E731
    else:  # the one worker is `run` itself, its epochs slowed
        env = worker_env()
        ready = lambda: _running_with_checkpoint(url, tmp_path)  # noqa: E731
    term = _Terminal(["run", str(study), *workers], pause=1.0, env=env)
    try:
        wait_for(ready, 90, "a running trial")
    except BaseException:
        os.kill(term.pid, signal.SIGKILL)
        raise
    term.hang_up()
    assert term.wait(60) == 129, term.text()
    states = [t.state for t in trials(url)]
    assert TrialState.RUNNING not in states and TrialState.WAITING in states, states
    assert states.count(TrialState.FAIL) == states.count(TrialState.WAITING), states  # each handed back once


def test_a_second_signal_to_run_with_workers_stops_its_workers_at_once(tmp_path: Path):
    """The user's second Ctrl-C or kill reaches the workers too: `run` gone, they would hear only
    the parent-death SIGHUP, which does not cut a hand-back short."""
    url, run, workers, paused = _run_with_a_paused_worker(tmp_path, CYCLE_OPTUNA_TEST_PAUSE_HANDING_BACK="120")
    run.send_signal(signal.SIGTERM)
    wait_for(_log_says(paused[0], "paused handing back"), 30, "the worker's hand-back under way")
    run.send_signal(signal.SIGTERM)
    rc, out = _finish(run, timeout=30)
    assert rc == 143 and "second SIGTERM: stopping now" in out, out
    wait_for(lambda: not any(_alive(p) for p in workers), 30, "the workers to stop at once")
    assert "second SIGTERM: stopping now" in paused[0].read_text()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_run_with_workers_stops_its_workers_with_the_signal_it_got(tmp_path: Path, sig, code):
    """Ctrl-C on `run --workers K` is a Ctrl-C for each worker, `kill` a SIGTERM: the handed-back
    trials, the workers' logs and the exit code name what the user did."""
    url, run, workers, paused = _run_with_a_paused_worker(tmp_path)
    run.send_signal(sig)
    rc, out = _finish(run, timeout=60)
    assert rc == code, out
    assert "interrupted: 2 workers stopped" in out
    # this process holds no trial: it says what it does
    assert f"{sig.name}: stopping the 2 workers, which hand back their running trials" in out
    assert "handing back the running trial" not in out
    wait_for(lambda: not any(_alive(p) for p in workers), 60, "the workers to stop")
    ts = trials(url)
    assert ts and TrialState.RUNNING not in [t.state for t in ts]  # handed back
    text = paused[0].read_text()
    other = {signal.SIGINT: "SIGTERM", signal.SIGTERM: "SIGINT"}[sig]
    assert sig.name in text and other not in text, text


def test_run_with_workers_ends_0_when_the_others_finish_a_killed_workers_study(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = write_study(tmp_path, n_trials=3, epochs=1)
    run = start_cli(["run", str(study), "--workers", "2"], env=worker_env(CYCLE_OPTUNA_TEST_PAUSE_AFTER_ASK="2"))
    log = tmp_path / "tiny-worker-1.log"
    wait_for(lambda: log.exists() and "paused after ask" in log.read_text(), 120, "worker 1 paused with a trial")
    victim = next(p for p in _children(run.pid) if f"tiny-worker-1" in Path(f"/proc/{p}/fd/1").resolve().name)
    subprocess.run(["kill", "-9", str(victim)], check=True)
    code, out = _finish(run, timeout=240)
    assert code == 0, out
    assert "a worker was killed by SIGKILL" in out and "the other workers took over" in out and "cycles of tiny" in out
    done = [t for t in trials(url) if t.state.is_finished() and t.state != TrialState.FAIL]
    assert len(done) == 3


def test_a_worker_killed_while_making_a_new_sqlite_database_leaves_no_file_that_cannot_open(tmp_path):
    # SQLite makes Optuna's tables one commit at a time: a worker killed among them (kill -9 or a
    # Ctrl-C in its first second) left a file of some tables on which every command then failed
    # with Optuna's "exception during the commit". Now the database is made whole beside its place
    study = write_study(tmp_path, n_trials=1, epochs=1)
    log = tmp_path / "victim.log"
    victim = _start(["worker", str(study)], log, CYCLE_OPTUNA_TEST_PAUSE_SQLITE_MADE="60")
    wait_for(_log_says(log, "paused sqlite made"), 90, "the worker to make its database")
    victim.kill()
    victim.wait(timeout=30)
    assert not (tmp_path / "tiny.db").exists()
    left = list(tmp_path.glob(".cycle-optuna-new-*"))  # what it left beside it, a hidden file
    assert left
    for p in left:  # an hour old: the next creator removes it
        os.utime(p, (p.stat().st_mtime - 7200,) * 2)
    done = subprocess.run([sys.executable, "-m", "cycle_optuna.cli", "worker", str(study)], env=worker_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [t.state for t in trials(f"sqlite:///{tmp_path / 'tiny.db'}")] == [TrialState.COMPLETE]
    assert not list(tmp_path.glob(".cycle-optuna-new-*"))  # the dead worker's half-made file is gone


def test_a_sqlite_file_of_part_of_optunas_tables_is_one_line_naming_it(tmp_path):
    import sqlite3

    study = write_study(tmp_path, n_trials=1, epochs=1)
    db = tmp_path / "tiny.db"
    with sqlite3.connect(db) as con:  # what a start cut off among the tables left (an earlier release)
        con.execute("CREATE TABLE studies (study_id INTEGER PRIMARY KEY, study_name VARCHAR(512))")
        con.execute("CREATE TABLE version_info (version_info_id INTEGER PRIMARY KEY, schema_version INTEGER, "
                    "library_version VARCHAR(256))")
    before = db.read_bytes()
    for command in ("worker", "run", "status", "best"):
        proc = subprocess.run([sys.executable, "-m", "cycle_optuna.cli", command, str(study)], env=worker_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (command, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "tiny.db holds only part of Optuna's tables" in lines[0], (command, proc.stderr)
        assert "delete the file" in lines[0]
    assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.db", "tiny.toml"]


# ---------------------------------------------------------------------------------------------
# `run --workers K` and a database that goes away as it starts its workers (a proxy in front of
# the server takes the database away from the run alone).
# ---------------------------------------------------------------------------------------------

# In the `run` process only (its workers are processes of their own): `worker.<name>` waits for the
# test's go-ahead, a file, so the test can take the database away at that very point.
_GATED = (
    "import os, time, cycle_optuna.worker as w\n"
    "real = w.{name}\n"
    "def gated(*a, **k):\n"
    "    print('at {name}', flush=True)\n"
    "    while not os.path.exists({gate!r}):\n"
    "        time.sleep(0.05)\n"
    "    return real(*a, **k)\n"
    "w.{name} = gated\n"
)


def _run_gated(tmp_path: Path, url: str, at: str, *flags: str) -> tuple[subprocess.Popen, Path, Path]:
    """`run --workers 2` on a two-trial study, held at `worker.<at>`; (process, its log, the gate)."""
    study = write_study(tmp_path, n_trials=2, epochs=1)
    log, gate = tmp_path / "run.log", tmp_path / "gate"
    run = _start(["run", str(study), "--workers", "2", "--storage", url, *flags], log,
                 prelude=_GATED.format(name=at, gate=str(gate)))
    wait_for(lambda: f"at {at}" in log.read_text() or run.poll() is not None, 90, f"run to reach {at}")
    assert run.poll() is None, log.read_text()
    return run, log, gate


def _worker_logs(tmp_path: Path) -> list[str]:
    return [p.read_text() if p.exists() else "" for p in (tmp_path / "tiny-worker-1.log", tmp_path / "tiny-worker-2.log")]


def test_run_workers_says_in_one_line_that_the_database_its_workers_died_of_cannot_be_read(tmp_path: Path, pg_url: str):
    """Its workers exit 2 (the database is away as they start, no --wait-for-storage); `run`
    cannot read the study to tell whether the others finished it: one line and their code, no
    traceback."""
    with pg_proxy(pg_url) as db:
        run, log, gate = _run_gated(tmp_path, db.url, "start_local_workers")
        db.stop()
        gate.touch()
        rc = run.wait(timeout=120)
    text = log.read_text()
    assert rc == 2, text
    assert text.count("a worker exited with code 2: error: cannot open storage") == 2, text
    assert "error: could not read the database to tell whether the study finished: storage " in text, text
    assert "Traceback" not in text


def test_run_workers_hands_wait_for_storage_to_its_workers(tmp_path: Path, pg_url: str):
    """The database away as `run --workers 2 --wait-for-storage 120` starts its workers: they wait
    for it (with what is left of the 120 s) and finish the study once it is back."""
    with pg_proxy(pg_url) as db:
        run, log, gate = _run_gated(tmp_path, db.url, "start_local_workers", "--wait-for-storage", "120")
        db.stop()
        gate.touch()
        wait_for(lambda: all("s for the database at" in t for t in _worker_logs(tmp_path)) or run.poll() is not None,
                 90, "both workers waiting for the database")
        assert run.poll() is None, log.read_text()
        db.start()
        rc = run.wait(timeout=180)
    text = log.read_text()
    assert rc == 0, text
    for worker_log in _worker_logs(tmp_path):
        assert "waiting up to " in worker_log and "answers" in worker_log, worker_log
    ts = trials(pg_url)
    assert len(ts) == 2 and all(t.state in FINISHED for t in ts), ts


def test_run_workers_waits_for_a_database_lost_while_it_opens_the_study(tmp_path: Path, pg_url: str):
    """The database answered `run`'s check before anything was opened, then went away as `run`
    opened the study for its workers: with --wait-for-storage it waits, within the same allowance."""
    with pg_proxy(pg_url) as db:
        run, log, gate = _run_gated(tmp_path, db.url, "open_study", "--wait-for-storage", "120")
        db.stop()
        gate.touch()
        wait_for(lambda: "s for the database at" in log.read_text() or run.poll() is not None, 90,
                 "run waiting for the database")
        assert run.poll() is None, log.read_text()
        db.start()
        rc = run.wait(timeout=180)
    text = log.read_text()
    assert rc == 0, text
    assert "waiting up to " in text and "answers" in text, text
    ts = trials(pg_url)
    assert len(ts) == 2 and all(t.state in FINISHED for t in ts), ts


def test_a_worker_waits_for_a_database_lost_while_it_opens_the_study(tmp_path: Path, pg_url: str):
    """As for `run`: `worker --wait-for-storage` waits out an outage between its check of the
    database and its opening of the study."""
    study = write_study(tmp_path, n_trials=1, epochs=1)
    log, gate = tmp_path / "worker.log", tmp_path / "gate"
    with pg_proxy(pg_url) as db:
        proc = _start(["worker", str(study), "--storage", db.url, "--wait-for-storage", "120"], log,
                      prelude=_GATED.format(name="open_study", gate=str(gate)))
        wait_for(lambda: "at open_study" in log.read_text() or proc.poll() is not None, 90, "the worker to open the study")
        assert proc.poll() is None, log.read_text()
        db.stop()
        gate.touch()
        wait_for(lambda: "s for the database at" in log.read_text() or proc.poll() is not None, 90,
                 "the worker waiting for the database")
        assert proc.poll() is None, log.read_text()
        db.start()
        rc = proc.wait(timeout=180)
    text = log.read_text()
    assert rc == 0, text
    assert "answers" in text, text
    ts = trials(pg_url)
    assert len(ts) == 1 and ts[0].state in FINISHED, ts


def test_a_database_lost_in_the_middle_of_a_command_is_one_line_not_an_unexpected_error(tmp_path: Path, pg_url: str):
    """`status` has opened the study; the database goes away before it reads the trials: that was
    "unexpected error: OperationalError ..." and exit 1."""
    study = write_study(tmp_path, n_trials=1, epochs=1)
    rc, out = _finish(start_cli(["worker", str(study), "--storage", pg_url]))
    assert rc == 0, out
    gate = tmp_path / "gate"
    prelude = ("import os, time, cycle_optuna.status as s\n"
               "real = s.collect\n"
               "def gated(*a, **k):\n"
               "    print('at collect', flush=True)\n"
               f"    while not os.path.exists({str(gate)!r}):\n"
               "        time.sleep(0.05)\n"
               "    return real(*a, **k)\n"
               "s.collect = gated\n")
    with pg_proxy(pg_url) as db:
        log = tmp_path / "status.log"
        proc = _start(["status", str(study), "--storage", db.url], log, prelude=prelude)
        wait_for(lambda: "at collect" in log.read_text() or proc.poll() is not None, 90, "status to open the study")
        db.stop()
        gate.touch()
        rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 2, text
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: lost the database: ") and "run again once it answers" in text
    assert "unexpected error" not in text and "Traceback" not in text


def test_a_damaged_sqlite_database_is_not_called_a_lost_one(tmp_path: Path):
    """SQLite's OperationalError is any fault of the file: "run again once it answers" would be false."""
    import sqlite3

    study = write_study(tmp_path, n_trials=1, epochs=1)
    rc, out = _finish(start_cli(["worker", str(study)]))
    assert rc == 0, out
    with sqlite3.connect(tmp_path / "tiny.db") as con:
        con.execute("ALTER TABLE trial_values DROP COLUMN value_type")
    proc = subprocess.run([sys.executable, "-m", "cycle_optuna.cli", "status", str(study)], env=worker_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "lost the database" not in proc.stderr and "unexpected error" in proc.stderr
