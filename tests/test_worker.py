"""The worker loop in-process: exact cap, checkpoints cleaned up, a retry resumes to the same result."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cycle_optuna import config, placement, storage, worker
from cycle_optuna.errors import ConfigError, StorageError
from cycle_optuna.objective import CHECKPOINT_ATTR, RESUMED_ATTR, TrialCheckpoints
from workers_helpers import drop_synthetic_keys, write_study


def test_worker_meets_the_cap_and_leaves_no_checkpoints(tmp_path: Path):
    cfg = config.load(write_study(tmp_path, n_trials=3, epochs=2))
    stats = worker.WorkerStats()
    study = worker.run_worker(cfg, storage.resolve_url(cfg), stats=stats)
    assert worker.trials_counted(study) == 3 and stats.states["COMPLETE"] == 3
    assert all(t.user_attrs[storage.WORKER_ATTR] == stats.worker for t in study.trials)
    assert not list((tmp_path / "tiny-artifacts").glob("checkpoint-*"))


def test_retry_resumes_from_the_parent_checkpoint_with_the_same_result(tmp_path: Path, monkeypatch):
    cfg = config.load(write_study(tmp_path, n_trials=1, epochs=3))
    url = storage.resolve_url(cfg)
    reference = worker.run_worker(cfg, url).best_value  # uninterrupted
    cfg2 = config.load(write_study(tmp_path, name="cut", n_trials=1, epochs=3))
    save = TrialCheckpoints.save

    def die_after_second_epoch(self, epoch, state):
        save(self, epoch, state)
        if epoch == 1:
            raise KeyboardInterrupt  # the worker hands the trial back, as on SIGTERM
    monkeypatch.setattr(TrialCheckpoints, "save", die_after_second_epoch)
    try:
        worker.run_worker(cfg2, url)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(TrialCheckpoints, "save", save)
    study = worker.run_worker(cfg2, url)
    first, retry = study.trials
    assert first.state == TrialState.FAIL and CHECKPOINT_ATTR in first.user_attrs
    assert retry.user_attrs[RESUMED_ATTR] == "trial 0 epoch 2"
    assert retry.value == reference
    assert not list((tmp_path / "cut-artifacts").glob("checkpoint-*"))


def _sqlite_study(tmp_path: Path, name: str = "loop") -> tuple[optuna.Study, str]:
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    study = optuna.create_study(study_name=name, storage=storage.open_storage(url),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    return study, url


def test_the_loop_records_each_outcome_as_optimize_would_and_carries_on(tmp_path: Path):
    def fail(t):
        raise ValueError("bad trial")

    def prune(t):
        raise optuna.TrialPruned()

    outcomes = iter([lambda t: 1.0, fail, lambda t: float("nan"), prune, lambda t: 0.5])
    ended = []
    study, url = _sqlite_study(tmp_path)
    stats = worker.WorkerStats()
    worker.run_trials(study, url, 5, lambda t: next(outcomes)(t) + 0 * t.suggest_float("x", 0, 1),
                      hooks=worker.Hooks(on_trial_end=lambda s, t: ended.append(t.state)), stats=stats)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE]
    assert ended == states
    assert dict(stats.states) == {"COMPLETE": 2, "FAIL": 2, "PRUNED": 1}
    assert study.best_value == 0.5


def test_a_deadline_lets_the_running_trial_finish_and_starts_no_other(tmp_path: Path):
    """`--timeout`: the trial running when the time is up ends as it would have (COMPLETE, its value
    kept); no trial starts after it; the next run without a deadline goes on to the total."""
    study, url = _sqlite_study(tmp_path)
    deadline = time.monotonic() + 5.0  # time enough for the first ask on a loaded machine

    def until_the_deadline(t):  # the first trial is still running when the time is up
        x = t.suggest_float("x", 0, 1)
        while time.monotonic() <= deadline:
            time.sleep(0.02)
        return x

    stats = worker.WorkerStats()
    worker.run_trials(study, url, 4, until_the_deadline, stats=stats, deadline=deadline)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] and stats.timed_out
    assert "stopped at its time limit" in stats.summary()
    again = worker.WorkerStats()
    worker.run_trials(study, url, 4, lambda t: t.suggest_float("x", 0, 1), stats=again)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4 and not again.timed_out


def test_a_deadline_past_leaves_a_waiting_retry_for_the_next_run_and_a_full_study_is_no_timeout(tmp_path: Path):
    study, url = _sqlite_study(tmp_path)
    study.enqueue_trial({"x": 0.25})  # a retry waiting to run
    stats = worker.WorkerStats()
    worker.run_trials(study, url, 1, lambda t: t.suggest_float("x", 0, 1), stats=stats, deadline=time.monotonic())
    assert [t.state for t in study.trials] == [TrialState.WAITING] and stats.timed_out and not stats.states
    worker.run_trials(study, url, 1, lambda t: t.suggest_float("x", 0, 1))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    full = worker.WorkerStats()
    worker.run_trials(study, url, 1, lambda t: t.suggest_float("x", 0, 1), stats=full, deadline=time.monotonic())
    assert not full.timed_out  # nothing was left to run: not cut short


@pytest.mark.parametrize("folds", [1, 3])
def test_the_cycle_sampler_learns_from_the_data_which_batch_sizes_train_the_same(tmp_path: Path, folds):
    """A batch never holds more series than the training split; the sampler is told the largest
    split (a fold's, under cross-validation), above which every batch size is one configuration."""
    from cycle_optuna.data import load_study_data

    path = write_study(tmp_path, n_samples=60)
    path.write_text(path.read_text().replace('type = "random"', 'type = "cycle"').replace("folds = 1", f"folds = {folds}")
                    .replace("[space]\n", "[space]\nbatch_size = { choices = [16, 32, 64] }\n"))
    cfg = config.load(path)
    data = load_study_data(cfg)
    views = data.cv_views() if folds > 1 else [data]
    largest = max(len(v.y_train) for v in views)
    assert largest < 64
    assert worker.build_sampler(cfg, data).ceilings == {"batch_size": largest}
    assert worker.build_sampler(cfg).ceilings == {}  # without the data (status, best): none


def test_a_retry_is_renamed_to_the_worker_that_runs_it(tmp_path: Path):
    study, url = _sqlite_study(tmp_path)
    study.enqueue_trial({"x": 0.25}, user_attrs={storage.WORKER_ATTR: "deadhost:1"})
    stats = worker.WorkerStats()
    worker.run_trials(study, url, 1, lambda t: t.suggest_float("x", 0, 1), stats=stats)
    (trial,) = study.trials
    assert trial.params == {"x": 0.25} and trial.user_attrs[storage.WORKER_ATTR] == stats.worker


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_workers_may_differ_in_how_they_run_but_not_in_what_a_trial_is(tmp_path: Path):
    path = write_study(tmp_path, n_trials=1, epochs=1)
    cfg = config.load(path)
    url = storage.resolve_url(cfg)
    worker.open_study(cfg, url)
    # a GPU worker that packs and compiles, with its own threads and eval batch: the same study
    _edit(path, "threads = 1", 'threads = 2\npack = 4\ncompile = true\ndevice = "cpu"\neval_batch_size = 64')
    worker.open_study(config.load(path), url)
    # a different number of epochs is a different trial: refused, naming the key
    _edit(path, "epochs = 1", "epochs = 2")
    with pytest.raises(StorageError, match=r"different trial definition \(train\.epochs: study has 1, file has 2\)"):
        worker.open_study(config.load(path), url)
    _edit(path, "epochs = 2", "epochs = 1")
    # the seed draws the split, the folds and the initial weights: another seed is another trial,
    # while the total and the sampler are the file's own to change
    _edit(path, "seed = 0", "seed = 5")
    with pytest.raises(StorageError, match=r"different trial definition \(study\.seed: study has 0, file has 5\)"):
        worker.open_study(config.load(path), url)
    _edit(path, "seed = 5", "seed = 0")
    _edit(path, "n_trials = 1", "n_trials = 3")
    _edit(path, 'type = "random"', 'type = "tpe"')
    worker.open_study(config.load(path), url)


def test_a_study_keeps_its_artifact_folder(tmp_path: Path, monkeypatch):
    """Readers load the best model from the folder stored on the study: a worker told another folder
    would save the next best model where no reader looks."""
    path = write_study(tmp_path, n_trials=1, epochs=1)
    url = storage.resolve_url(config.load(path))
    worker.open_study(config.load(path), url)
    kept = config.resolve_artifact_dir(config.load(path))
    kept.mkdir(exist_ok=True)
    _edit(path, "[study]\n", '[study]\nartifact_dir = "elsewhere"\n')
    with pytest.raises(ConfigError, match=rf"study\.artifact_dir: study 'tiny' keeps its models and checkpoints in "
                                          rf"{re.escape(str(kept.resolve()))}, where it was created, but the file now says "
                                          rf"{re.escape(str(tmp_path / 'elsewhere'))}; set it back"):
        worker.open_study(config.load(path), url)
    assert not (tmp_path / "elsewhere").exists()
    monkeypatch.setenv(storage.ARTIFACTS_ENV_VAR, str(tmp_path / "shared"))  # one folder named for all, outside
    worker.open_study(config.load(path), url)


def test_a_worker_joins_with_the_same_data_file_at_another_path(tmp_path: Path):
    rows = ["sample,label,f0"] + [f"s{i},{'ab'[i % 2]},{i % 2 + 0.01 * t}" for i in range(40) for t in range(6)]
    here, there = tmp_path / "here", tmp_path / "there"  # two machines' copies of one project
    for folder in (here, there):
        folder.mkdir()
        (folder / "d.csv").write_text("\n".join(rows) + "\n")
        path = write_study(folder, n_trials=1, epochs=1)
        path.write_text(drop_synthetic_keys(path.read_text()))
        _edit(path, "[data]\n", '[data]\nsource = "d.csv"\n')
    cfg = config.load(here / "tiny.toml")
    url = storage.resolve_url(cfg)
    study = worker.open_study(cfg, url)
    assert study.user_attrs[worker.DIGESTS_ATTR] == worker.data_digests(cfg)
    theirs = config.load(there / "tiny.toml")
    assert theirs.to_dict()["data"]["source"] != cfg.to_dict()["data"]["source"]
    worker.open_study(theirs, url)  # the same content at another path: joins
    (there / "d.csv").write_text("\n".join(rows[:-1]) + "\n")  # other data at the same name: refused
    with pytest.raises(StorageError, match=r"different trial definition \(data\.source: study has '.*here/d\.csv "
                                           r"\(sha256 \w{12}\)', file has '.*there/d\.csv \(sha256 \w{12}\)'\)"):
        worker.open_study(config.load(there / "tiny.toml"), url)
    (here / "d.csv").write_text("\n".join(rows[:-1]) + "\n")  # the study's own file, changed in place: refused
    with pytest.raises(StorageError, match=r"data\.source: study has '.*here/d\.csv \(sha256 \w{12}\)', "
                                           r"file has '.*here/d\.csv \(sha256 \w{12}\)'"):
        worker.open_study(config.load(here / "tiny.toml"), url)


def test_a_study_stored_before_folds_existed_is_the_validation_split(tmp_path: Path):
    path = write_study(tmp_path, n_trials=1, epochs=1)  # folds = 1
    cfg = config.load(path)
    url = storage.resolve_url(cfg)
    study = worker.open_study(cfg, url)
    stored = study.user_attrs[worker.CONFIG_ATTR]
    del stored["data"]["folds"]  # as a release before [data] folds wrote it
    study.set_user_attr(worker.CONFIG_ATTR, stored)
    worker.open_study(cfg, url)  # folds = 1 is what that study did
    _edit(path, "folds = 1", 'folds = "auto"')
    with pytest.raises(StorageError, match=r"data\.folds: study has 1, file has 'auto'"):
        worker.open_study(config.load(path), url)


def test_a_study_stored_before_the_model_switches_existed_goes_on_without_them(tmp_path: Path):
    """An upgrade adds model knobs to [baseline]; a study made before them ran with them off."""
    path = write_study(tmp_path, n_trials=1, epochs=1)
    cfg = config.load(path)
    url = storage.resolve_url(cfg)
    study = worker.open_study(cfg, url)
    stored = study.user_attrs[worker.CONFIG_ATTR]
    for key in ("summary_features", "step_conv"):
        del stored["baseline"][key]  # as a release before the key wrote it
    study.set_user_attr(worker.CONFIG_ATTR, stored)
    worker.open_study(cfg, url)
    _edit(path, "[baseline]", "[baseline]\nstep_conv = true")
    with pytest.raises(StorageError, match=r"baseline\.step_conv: study has False, file has True"):
        worker.open_study(config.load(path), url)


def test_workers_started_by_hand_on_one_machine_share_its_cores(tmp_path: Path, monkeypatch):
    """Before each trial a worker without a thread count sets cores // the study's live workers here."""
    import os
    import socket
    import subprocess
    import sys

    import torch

    monkeypatch.setattr(worker, "available_cores", lambda: 8)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    threads = torch.get_num_threads()
    try:
        mine, theirs, dead = study.ask(), study.ask(), study.ask()
        mine.set_user_attr(storage.WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        theirs.set_user_attr(storage.WORKER_ATTR, f"{socket.gethostname()}:{other.pid}")
        dead.set_user_attr(storage.WORKER_ATTR, f"{socket.gethostname()}:999999999")  # no such process
        study.tell(study.ask(), 1.0)  # finished trials do not count
        loop = worker._Loop(study, "sqlite://", 1, lambda t: 0.0, worker.Hooks(), worker.WorkerStats())
        loop.heartbeat.beat_for(mine._trial_id)  # this process runs it, as the loop does before sharing
        assert storage.local_workers(study) == 2
        loop._share_cores()
        assert torch.get_num_threads() == 4
        other.kill()
        other.wait()
        assert storage.local_workers(study) == 1
        loop._share_cores()
        assert torch.get_num_threads() == 8
    finally:
        loop.heartbeat.beat_for(None)
        other.kill()
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("share", "cores", "others", "threads"), [
    (2, 2, None, 2),  # not measured (no /proc/stat): the share
    (2, 2, 0.1, 2),  # idle apart from daemons
    (2, 2, 0.3, 1),  # a quarter of a core busy elsewhere takes a thread
    (2, 2, 1.9, 1),  # never fewer than one
    (2, 2, 5.0, 1),
    (8, 16, 3.0, 8),  # the share is the cap: 13 free cores
    (16, 16, 3.0, 13),
    (4, 8, 7.9, 1),
])
def test_threads_leave_the_cores_other_processes_keep_busy(share, cores, others, threads):
    assert placement.threads_beside(share, cores, others) == threads


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="CPU load is read from Linux's /proc/stat")
def test_a_worker_beside_busy_processes_trains_on_fewer_threads(tmp_path: Path, monkeypatch, caplog):
    """Two processes keep two cores busy: a worker without a thread count sets one torch thread
    before its first trial, rather than two threads spinning against them (about 12x slower)."""
    import subprocess
    import sys

    import torch

    monkeypatch.setattr(worker, "available_cores", lambda: 2)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        loop = worker._Loop(study, "sqlite://", 1, lambda t: 0.0, worker.Hooks(), worker.WorkerStats(),
                            share_cores=True)
        with caplog.at_level("WARNING", logger=worker.__name__):
            loop._share_cores()  # first trial: measured over a quarter of a second first
        assert loop.load.last is not None and loop.load.last > 0.75, loop.load.last
        assert torch.get_num_threads() == 1
        assert "other processes keep" in caplog.text and "1 torch thread for this worker" in caplog.text
    finally:
        for p in busy:
            p.kill()
            p.wait()
        torch.set_num_threads(threads)


_SPIN = """
import time
from cycle_optuna import placement
load = placement.CoreLoad()
start, end = time.process_time(), time.monotonic() + 10
while time.process_time() - start < 0.5 and time.monotonic() < end:  # half a second of CPU, however busy the machine
    pass
print(load.others(), time.process_time())
"""


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="CPU load is read from Linux's /proc/stat")
def test_a_process_own_work_is_not_counted_as_load():
    """A child spins on a core while this process sleeps: to this process the child is load, to the
    child itself it is not, so the child measures less busy elsewhere by about what it ran."""
    import subprocess
    import sys

    load = placement.CoreLoad()
    began = time.monotonic()
    child = subprocess.run([sys.executable, "-c", _SPIN], capture_output=True, text=True, check=True)
    mine = load.others()
    wall = time.monotonic() - began
    theirs, spent = map(float, child.stdout.split())
    assert spent > 0.5  # it did run
    # the child's CPU time over this window is load to this process, not to the child: other jobs
    # on the machine count in both, so the gap is about the child's own share of a core
    assert mine is not None and mine - theirs > 0.5 * spent / wall, (mine, theirs, spent, wall)


@pytest.mark.parametrize("kind", ["random", "tpe"])
def test_a_resumed_study_draws_what_an_uninterrupted_one_would(tmp_path: Path, kind: str):
    """Optuna's samplers are seeded per trial: seeded once per process, a second `run` (or a second
    worker) would start the same sequence again and repeat the first run's configurations."""
    params = {}
    for how, runs in (("at once", [4]), ("resumed", [2, 4])):
        folder = tmp_path / how.replace(" ", "-")
        folder.mkdir()
        path = write_study(folder, n_trials=4, epochs=1)
        _edit(path, 'type = "random"', f'type = "{kind}"')
        for total in runs:
            cfg = config.override(config.load(path), n_trials=total, storage=None)
            study = worker.run_worker(cfg, storage.resolve_url(cfg))
        params[how] = [t.params["lr"] for t in study.trials]
    assert len(set(params["resumed"])) == 4, params  # trials 3 and 4 are not trials 1 and 2 again
    assert params["resumed"] == params["at once"]


def test_a_lost_storage_is_named_by_the_deepest_error_that_says_something():
    """SQLAlchemy's pool raises a bare InvalidatePoolError beneath the server's own reason."""
    import sqlalchemy.exc

    try:
        try:
            try:
                raise sqlalchemy.exc.InvalidatePoolError()
            except Exception:
                raise ConnectionError("terminating connection due to administrator command")
        except Exception as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from e
    except Exception as e:
        assert str(worker._root(e)) == "terminating connection due to administrator command"


_NO_SPACE = """
[study]
name = "patches"
n_trials = {n_trials}
seed = 0

[data]
source = "train.npz"

[train]
epochs = 1
min_epoch_samples = 0

[baseline]
hidden_dim = 16
n_layers = 1
{baseline}
{space}
"""


def _series_file(folder: Path, steps: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    np.savez(folder / "train.npz", X=rng.normal(y[:, None, None], 1.0, (40, steps, 1)), y=y)


def test_a_file_without_space_also_searches_patch_len_around_the_automatic_one(tmp_path: Path):
    """The default space left patch_len at its automatic value: a short motif at a random position
    (benchmarks/make_kinds.py MotifPos, 300 steps) scored 0.65 on test at the automatic 16 and 0.97
    at 8, and a study of a file without [space] could never move it."""
    from cycle_optuna.api import study_config

    _series_file(tmp_path, 64)  # automatic patch: 4 (16 tokens)
    path = tmp_path / "patches.toml"
    path.write_text(_NO_SPACE.format(n_trials=2, baseline="", space=""))
    study = worker.run_worker(config.load(path), f"sqlite:///{tmp_path / 'patches.db'}")
    cfg = study_config(study)
    assert cfg.baseline.patch_len == 4 and cfg.space[0] == config.ParamSpace(name="patch_len", choices=(2, 4, 8))
    assert [p.name for p in cfg.space[1:]] == list(config.DEFAULT_SPACE)
    assert study.trials[0].params["patch_len"] == 4  # cycle 1: the automatic patch
    # the same file joins the study it made, and grows it
    study = worker.run_worker(config.override(config.load(path), n_trials=3), f"sqlite:///{tmp_path / 'patches.db'}")
    assert len(study.trials) == 3 and all("patch_len" in t.params for t in study.trials)
    # a [space] written, or a patch_len chosen, is searched as written
    for baseline, space, name in (("", "[space]\nlr = { low = 1e-4, high = 1e-2, log = true }", "spaced"),
                                  ("patch_len = 8", "", "chosen")):
        path.write_text(_NO_SPACE.format(n_trials=1, baseline=baseline, space=space))
        study = worker.run_worker(config.load(path), f"sqlite:///{tmp_path / (name + '.db')}")
        assert "patch_len" not in study.trials[0].params
        assert study_config(study).baseline.patch_len == (8 if name == "chosen" else 0)


def test_a_study_made_before_patch_len_was_searched_is_joined_as_it_was_made(tmp_path: Path):
    """A study made by a file without [space] before the default searched patch_len stored the
    default space without it and the automatic patch (0): the same file must still join it."""
    _series_file(tmp_path, 64)
    path = tmp_path / "patches.toml"
    import json

    path.write_text(_NO_SPACE.format(n_trials=1, baseline="", space=""))
    space = "[space]\n" + "\n".join(  # what such a study stored: the default space and patch_len 0
        f"{name} = {{ {', '.join(f'{k} = {json.dumps(v)}' for k, v in spec.items())} }}"
        for name, spec in config.default_space(config.load(path).baseline).items())
    path.write_text(_NO_SPACE.format(n_trials=1, baseline="", space=space))
    url = f"sqlite:///{tmp_path / 'patches.db'}"
    worker.run_worker(config.load(path), url)
    path.write_text(_NO_SPACE.format(n_trials=2, baseline="", space=""))
    study = worker.run_worker(config.load(path), url)
    assert len(study.trials) == 2 and not any("patch_len" in t.params for t in study.trials)


def test_a_worker_interrupted_in_its_first_trial_says_none_finished():
    """It said "no trials in 7s; handed back cycle 1", as if no trial had run."""
    line = worker.WorkerStats(worker="vm:1", requeued=[0]).summary()
    assert re.fullmatch(r"worker vm:1: no trial finished in \d+s; handed back cycle 1 for retry", line), line
