"""Fault tolerance with real worker processes on the real PostgreSQL server: SIGKILL, restart, SIGTERM."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from optuna.trial import TrialState

from cycle_optuna.objective import CHECKPOINT_ATTR, RESUMED_ATTR
from workers_helpers import start_cli, trials, wait_for, write_study

pytestmark = pytest.mark.postgres


def _running_with_checkpoint(url: str):
    return next((t for t in trials(url) if t.state == TrialState.RUNNING and CHECKPOINT_ATTR in t.user_attrs), None)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_killed_worker_trial_is_retried_from_its_checkpoint(tmp_path: Path, pg_url: str):
    study = write_study(tmp_path, n_trials=1, epochs=4)
    victim = start_cli(["worker", str(study), "--storage", pg_url], pause=1.0)
    hit = wait_for(lambda: _running_with_checkpoint(pg_url), 90, "a trial with an epoch checkpoint")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rescuer = start_cli(["worker", str(study), "--storage", pg_url])
    code, out = _finish(rescuer)
    assert code == 0, out
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


def test_database_restart_loses_no_finished_trial(tmp_path: Path, pg_url: str):
    study = write_study(tmp_path, n_trials=6, epochs=3)
    procs = [start_cli(["--debug", "worker", str(study), "--storage", pg_url], pause=0.3) for _ in range(2)]
    wait_for(lambda: sum(t.state in FINISHED for t in trials(pg_url)) >= 1, 120, "a finished trial")
    before = {t.number: (t.state, t.value) for t in trials(pg_url) if t.state in FINISHED}
    cluster = next(Path("/etc/postgresql").iterdir()).name
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart"], check=True,
                   timeout=60, capture_output=True)
    results = [_finish(p, timeout=180) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    ts = trials(pg_url)
    after = {t.number: (t.state, t.value) for t in ts if t.state in FINISHED}
    assert before.items() <= after.items()  # nothing finished was lost or changed
    assert len(after) == 6  # the cap, met exactly (the default median pruner may prune some)
    retried = [t for t in ts if t.state == TrialState.FAIL]
    assert len(retried) <= 2  # at most the in-flight trials
    assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_worker_hands_its_trial_back(tmp_path: Path, pg_url: str, sig, code):
    study = write_study(tmp_path, n_trials=1, epochs=4)
    proc = start_cli(["worker", str(study), "--storage", pg_url], pause=1.0)
    hit = wait_for(lambda: _running_with_checkpoint(pg_url), 90, "a trial with an epoch checkpoint")
    proc.send_signal(sig)
    rc, out = _finish(proc, timeout=60)
    assert rc == code, out
    assert "interrupted: worker" in out and f"handed back trial {hit.number}" in out
    ts = trials(pg_url)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.WAITING]  # no RUNNING zombie
    rc, out = _finish(start_cli(["worker", str(study), "--storage", pg_url]))
    assert rc == 0, out
    done = trials(pg_url)[1]
    assert done.state == TrialState.COMPLETE and done.user_attrs[RESUMED_ATTR].startswith(f"trial {hit.number}")
