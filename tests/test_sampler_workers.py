"""CycleSampler with real worker processes on one SQLite study, and inside Hyperband's view."""

from __future__ import annotations

import math
import multiprocessing as mp
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from cycle_optuna.sampler import CycleSampler

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASELINE = {"lr": 5e-4, "n_layers": 2, "hidden_dim": 64, "n_heads": 4, "dropout": 0.1}


def objective(trial: optuna.Trial) -> float:
    lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    layers = trial.suggest_int("n_layers", 1, 6)
    hidden = trial.suggest_categorical("hidden_dim", [32, 64, 128, 256])
    heads = trial.suggest_categorical("n_heads", [2, 4, 8])
    dropout = trial.suggest_float("dropout", 0.0, 0.5)
    assert hidden % heads == 0
    time.sleep(0.3)  # long enough for the workers' trials to overlap
    return (math.log10(lr) + 2.5) ** 2 + 0.05 * (layers - 3) ** 2 + 0.1 * dropout + 0.01 * math.log2(hidden)


def worker(url: str, rank: int, n_trials: int, barrier) -> None:
    """One worker process: its own storage connection and sampler, as `cycle-optuna worker` has."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})
    sampler = CycleSampler(baseline=BASELINE, seed=rank, plateau_cycles=100)
    study = optuna.load_study(study_name="workers", storage=storage, sampler=sampler)
    barrier.wait(timeout=60)  # start together, so that trials overlap from the first one
    study.optimize(objective, n_trials=n_trials)


def test_four_worker_processes_never_share_a_configuration(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'workers.db'}"
    optuna.create_study(study_name="workers", storage=url)
    n_workers, n_trials = 4, 5
    # fork: real processes without re-importing torch in each (the sampler only needs optuna)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(n_workers)
    procs = [ctx.Process(target=worker, args=(url, rank, n_trials, barrier)) for rank in range(n_workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * n_workers

    trials = optuna.load_study(study_name="workers", storage=url).trials
    assert len(trials) == n_workers * n_trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    configs = [tuple(sorted(t.params.items())) for t in trials]
    shared = [
        f"{t.number} {t.datetime_start:%S.%f}-{t.datetime_complete:%S.%f} {t.user_attrs['cycle_reason']}"
        for t, c in zip(trials, configs) if configs.count(c) > 1
    ]
    assert not shared, "trials share a configuration:\n" + "\n".join(shared)
    assert trials[0].params == BASELINE
    assert all(t.params["hidden_dim"] % t.params["n_heads"] == 0 for t in trials)
    assert all(t.user_attrs["cycle_reason"].startswith(f"cycle {t.number + 1}: ") for t in trials)
    overlapping = sum(
        a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
        for i, a in enumerate(trials) for b in trials[i + 1 :]
    )
    assert overlapping >= n_workers, "the workers did not run at the same time; the test proves nothing"


def test_inside_hyperband_bracket_view():
    pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9, reduction_factor=3)
    study = optuna.create_study(sampler=CycleSampler(baseline={"x": 0.0, "y": 5}, seed=0), pruner=pruner)

    def objective(trial):
        x, y = trial.suggest_float("x", -3, 3), trial.suggest_int("y", 0, 10)
        for step in range(9):
            value = (x - 1) ** 2 + (y - 2) ** 2 + 1 / (step + 1)
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    study.optimize(objective, n_trials=25)
    trials = study.trials
    assert len(pruner._pruners) > 1  # several brackets really were in play
    assert {TrialState.COMPLETE, TrialState.PRUNED} >= {t.state for t in trials}
    assert all("cycle_move" in t.user_attrs for t in trials)
    local = [tuple(sorted(t.params.items())) for t in trials if not t.user_attrs["cycle_move"].startswith("explore")]
    assert len(set(local)) == len(local)
    assert study.best_value < objective_at(0.0, 5)


def objective_at(x: float, y: int) -> float:
    return (x - 1) ** 2 + (y - 2) ** 2 + 1 / 9


class _PausingSampler(CycleSampler):
    """Test hook: pauses trial 1 between deciding and writing its proposal, the worst moment
    for two workers that decide at once."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.paused, self.resume = threading.Event(), threading.Event()

    def _write(self, study, trial, payload, reason) -> None:
        if trial.number == 1 and not self.paused.is_set():
            self.paused.set()
            assert self.resume.wait(timeout=30)
        super()._write(study, trial, payload, reason)


def test_two_trials_deciding_at_once_do_not_claim_the_same_move():
    sampler = _PausingSampler(baseline=BASELINE, seed=0, plateau_cycles=100)
    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=1)
    asked: dict[int, optuna.trial.FrozenTrial] = {}

    def ask_one() -> None:
        t = study.ask()
        objective(t)  # suggests every param
        asked[t.number] = study._storage.get_trial(t._trial_id)

    first = threading.Thread(target=ask_one)
    first.start()
    assert sampler.paused.wait(timeout=30)
    ask_one()  # trial 2 decides from the same history; trial 1 has not written its claim yet
    sampler.resume.set()
    first.join(timeout=60)
    one, two = asked[1], asked[2]
    assert one.user_attrs["cycle_move"] != "explore (tpe)" and two.user_attrs["cycle_move"] != "explore (tpe)"
    assert one.params != two.params, (one.user_attrs["cycle_reason"], two.user_attrs["cycle_reason"])
    assert one.user_attrs["cycle_parent"] == two.user_attrs["cycle_parent"] == 1
