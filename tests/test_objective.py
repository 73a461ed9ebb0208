"""The objective: trial contract attrs, pruning through a real pruner, diverged and impossible trials."""

from __future__ import annotations

import dataclasses
import math

import optuna
import pytest
import torch
from optuna.trial import TrialState

from cycle_optuna import config, objective, storage
from cycle_optuna.config import PrunerConfig
from cycle_optuna.data import load_task
from cycle_optuna.train import EpochMetrics, TrainResult

CONTRACT = ("val_accuracy", "train_loss", "epochs_run", "improvement_pct", "diagnosis", "n_params",
            "train_seconds", "samples_per_second", "nan_batches")


@pytest.fixture
def cfg(quick_study):
    return config.load(quick_study)


@pytest.fixture
def data(cfg):
    return load_task(cfg.data, cfg.study.seed)


def sqlite_study(tmp_path, cfg, pruner=None, sampler=None):
    return optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'o.db'}",
        pruner=pruner or objective.make_pruner(cfg.pruner, cfg.train.epochs),
        sampler=sampler or optuna.samplers.RandomSampler(seed=0),
    )


def test_complete_trial_writes_the_contract_and_saves_the_model(tmp_path, cfg, data):
    study = sqlite_study(tmp_path, cfg)
    obj = objective.Objective(cfg, data, artifact_store=storage.artifact_store(cfg))
    study.enqueue_trial({p.name: getattr(cfg.baseline, p.name) for p in cfg.space})
    study.optimize(obj, n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE
    assert set(CONTRACT) <= set(trial.user_attrs)
    assert trial.user_attrs["diagnosis"] in objective.DIAGNOSES
    assert 1 <= trial.user_attrs["epochs_run"] <= cfg.train.epochs
    assert 0.0 <= trial.user_attrs["val_accuracy"] <= 1.0
    assert trial.user_attrs["n_params"] > 0
    assert len(trial.intermediate_values) == trial.user_attrs["epochs_run"]
    assert math.isclose(trial.value, min(trial.intermediate_values.values()))
    assert "model_artifact_id" in trial.user_attrs
    assert (storage.artifact_store(cfg)._base_path / trial.user_attrs["model_artifact_id"]).is_file()
    (meta,) = optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)  # the dashboard lists these
    assert (meta.filename, meta.mimetype) == ("model.pt", "application/octet-stream")


def _finished_far_ahead(study: optuna.Study, epochs: int) -> None:
    """A finished trial at val loss 0.01 every epoch: far better than the model reaches at epoch 0."""
    good = study.ask()
    for step in range(epochs):
        good.report(0.01, step)
    study.tell(good, 0.01)


def test_real_pruner_prunes_a_trial_that_falls_behind(tmp_path, cfg, data):
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    study = sqlite_study(tmp_path, cfg, pruner=pruner)
    _finished_far_ahead(study, cfg.train.epochs)
    study.optimize(objective.Objective(cfg, data), n_trials=1)
    trial = study.trials[-1]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["epochs_run"] == 1
    assert "fell behind" in trial.user_attrs["prune_reason"]


def test_a_trial_behind_only_at_its_last_epoch_completes(tmp_path, cfg, data):
    # the median pruner may act only at the last epoch here, where pruning would save nothing
    full = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, early_stopping_patience=0))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=full.train.epochs - 1)
    study = sqlite_study(tmp_path, full, pruner=pruner)
    _finished_far_ahead(study, full.train.epochs)
    study.optimize(objective.Objective(full, data), n_trials=1)
    trial = study.trials[-1]
    assert trial.state == TrialState.COMPLETE
    assert len(trial.intermediate_values) == trial.user_attrs["epochs_run"] == full.train.epochs
    assert pruner.prune(study, trial)  # it is behind: the pruner would have stopped it there


def test_the_parent_pruner_says_in_numbers_why_it_pruned(tmp_path, cfg, data):
    from cycle_optuna.pruners import ParentCurvePruner

    pruner = ParentCurvePruner(n_steps=cfg.train.epochs, warmup_fraction=0.0, patience=1)
    study = sqlite_study(tmp_path, cfg, pruner=pruner)
    _finished_far_ahead(study, cfg.train.epochs)
    study.optimize(objective.Objective(cfg, data), n_trials=1)
    trial = study.trials[-1]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["prune_reason"].startswith(f"val loss {trial.intermediate_values[0]:.4f} at epoch 1: best value ")
    assert trial.user_attrs["prune_reason"].endswith(
        "was behind the best finished trial, cycle 1 (0.01 by the same epoch) at 1 reported epoch in a row")


def test_diverged_trial_ends_pruned_with_diagnosis(tmp_path, cfg, data):
    wild = dataclasses.replace(cfg, space=(), baseline=dataclasses.replace(cfg.baseline, lr=1e6),
                               train=dataclasses.replace(cfg.train, grad_clip=0.0, max_bad_batches=2, warmup_epochs=0.0))
    study = sqlite_study(tmp_path, wild, pruner=optuna.pruners.NopPruner())
    study.optimize(objective.Objective(wild, data), n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["diagnosis"] == "diverged"


def test_impossible_combination_fails_with_a_reason_and_the_worker_goes_on(tmp_path, cfg, data):
    odd = config.parse({"data": {"n_samples": 240, "seq_len": 12, "n_features": 4},
                        "train": {"epochs": 1},
                        "baseline": {"hidden_dim": 16, "n_heads": 2},
                        "space": {"hidden_dim": {"choices": [16, 24]}, "n_heads": {"choices": [2, 3]}}})
    study = sqlite_study(tmp_path, odd)
    study.enqueue_trial({"hidden_dim": 16, "n_heads": 3})
    study.enqueue_trial({"hidden_dim": 16, "n_heads": 2})
    study.optimize(objective.Objective(odd, data), n_trials=2, catch=(Exception,))
    bad, good = study.trials
    assert bad.state == TrialState.FAIL
    assert bad.user_attrs["error"] == "impossible combination: n_heads=3 does not divide hidden_dim=16"
    assert good.state == TrialState.COMPLETE


@pytest.mark.parametrize(
    ("kind", "cls"),
    [("median", optuna.pruners.MedianPruner), ("percentile", optuna.pruners.PercentilePruner),
     ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
     ("hyperband", optuna.pruners.HyperbandPruner), ("patient", optuna.pruners.PatientPruner),
     ("none", optuna.pruners.NopPruner)],
)
def test_make_pruner_builds_each_configured_pruner(kind, cls):
    assert isinstance(objective.make_pruner(PrunerConfig(type=kind), epochs=9), cls)


def curve(vals, trains, best_epoch=None, diverged=False, nan=0):
    hist = [EpochMetrics(epoch=i, train_loss=t, val_loss=v, val_accuracy=0.5, lr=1e-3, nan_batches=0, seconds=0.1)
            for i, (v, t) in enumerate(zip(vals, trains))]
    finite = [v for v in vals if math.isfinite(v)]
    best = min(finite) if finite else math.inf
    return TrainResult(best_val_loss=best, best_val_accuracy=0.5,
                       best_epoch=vals.index(best) if best_epoch is None and finite else (best_epoch or 0),
                       final_train_loss=trains[-1], epochs_run=len(vals), history=hist, diverged=diverged,
                       stopped_early=False, nan_batches=nan, train_seconds=1.0, samples_per_second=1.0, model=None)


@pytest.mark.parametrize(
    ("vals", "trains", "kwargs", "expected"),
    [
        ([1.0, math.nan], [1.0, math.nan], {"diverged": True}, "diverged"),
        ([1.0, 0.9, 0.95], [1.0, 0.9, 0.9], {"nan": 3}, "unstable"),
        ([1.0, 1.2, 0.9, 1.1, 0.8, 1.0, 0.7], [1.0] * 7, {}, "unstable"),
        ([1.09, 1.08, 1.08, 1.07], [1.09, 1.08, 1.08, 1.07], {}, "underfit"),
        ([0.9, 0.7, 0.6, 0.65, 0.7], [0.9, 0.6, 0.4, 0.3, 0.2], {}, "overfit"),
        ([0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6], {}, "converging"),
        ([0.9, 0.7, 0.6, 0.6, 0.6], [0.9, 0.7, 0.6, 0.6, 0.6], {}, "converged"),
    ],
)
def test_diagnose_reads_the_learning_curves(vals, trains, kwargs, expected):
    assert objective.diagnose(curve(vals, trains, **kwargs), n_classes=3) == expected


def test_a_model_that_learned_only_the_class_prior_is_underfit_on_imbalanced_classes():
    """95/5 classes: predicting the prior scores a val loss of about 0.199, far below log 2 (0.693),
    and was called `converged` while every series got the majority class."""
    y = torch.tensor([0] * 95 + [1] * 5)
    chance = objective.prior_loss(y, 2)
    assert chance == pytest.approx(-(0.95 * math.log(0.95) + 0.05 * math.log(0.05)))
    assert objective.prior_loss(torch.tensor([0, 1, 2] * 4), 3) == pytest.approx(math.log(3))
    assert objective.prior_loss(torch.tensor([1, 1]), 3) == 0.0
    prior_only = curve([0.21, 0.20, 0.197, 0.196], [0.26, 0.25, 0.245, 0.244])
    assert objective.diagnose(prior_only, n_classes=2) == "converged"  # judged against log 2: the old verdict
    assert objective.diagnose(prior_only, n_classes=2, chance=chance) == "underfit"
    learned = curve([0.15, 0.09, 0.06, 0.06], [0.2, 0.1, 0.07, 0.06])  # well below the prior's loss
    assert objective.diagnose(learned, n_classes=2, chance=chance) == "converged"
    # class_weights = "balanced": both classes weigh the same, so a constant answer scores log 2 at
    # best; judged against the prior's 0.199, a balanced loss of 0.5 (well learned) read as underfit
    balanced = objective.prior_loss(y, 2, "balanced")
    assert balanced == pytest.approx(math.log(2))
    assert objective.prior_loss(torch.tensor([1, 1]), 3, "balanced") == 0.0
    weighed = curve([0.55, 0.5, 0.45, 0.42], [0.6, 0.5, 0.45, 0.42])
    assert objective.diagnose(weighed, n_classes=2, chance=chance) == "underfit"
    assert objective.diagnose(weighed, n_classes=2, chance=balanced) != "underfit"
