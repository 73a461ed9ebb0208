"""Create or load a study, check it matches the study file, and run one worker on it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from cycle_optuna import config as config_mod
from cycle_optuna import storage as storage_mod
from cycle_optuna.config import StudyConfig
from cycle_optuna.data import TaskData, load_task
from cycle_optuna.errors import StorageError
from cycle_optuna.objective import Objective, make_pruner
from cycle_optuna.sampler import make_sampler
from cycle_optuna.train import EpochMetrics

CONFIG_ATTR = "cycle_optuna_config"
STATS_ATTR = "data_stats"
_FINAL = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def build_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    """The study file's sampler, seeded by the study seed."""
    baseline = {p.name: getattr(cfg.baseline, p.name) for p in cfg.space}
    return make_sampler(cfg.sampler, baseline=baseline, seed=cfg.study.seed)


def open_study(
    cfg: StudyConfig, url: str, *, data: TaskData | None = None, create: bool = True
) -> optuna.Study:
    """Create or load the study; refuse one whose stored trial definition differs from `cfg`."""
    storage = storage_mod.open_storage(url)
    name = cfg.study.name
    exists = name in {s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    if not exists and not create:
        raise StorageError(f"no study named {name!r} in {storage_mod.mask(url)}")
    if exists:
        stored = optuna.load_study(study_name=name, storage=storage).user_attrs.get(CONFIG_ATTR)
        if stored is not None:
            _check_same_definition(cfg, stored)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=build_sampler(cfg),
        pruner=make_pruner(cfg.pruner, cfg.train.epochs),
        direction=cfg.study.direction,
        load_if_exists=True,
    )
    if CONFIG_ATTR not in study.user_attrs:
        study.set_user_attr(CONFIG_ATTR, cfg.to_dict())
    if data is not None and STATS_ATTR not in study.user_attrs:
        study.set_user_attr(STATS_ATTR, data.stats())
    if cfg.sampler.type not in ("cycle", "reference") and not study.get_trials(deepcopy=False):
        # cycle 1 is the baseline for every sampler; the cycle samplers propose it themselves
        study.enqueue_trial({p.name: getattr(cfg.baseline, p.name) for p in cfg.space})
    return study


def _check_same_definition(cfg: StudyConfig, stored: dict) -> None:
    mine = json.loads(json.dumps(cfg.trial_definition()))
    theirs = {k: stored.get(k) for k in mine}
    if mine == theirs:
        return
    diffs = [
        f"{section}.{key}: study has {theirs[section].get(key)!r}, file has {value!r}"
        for section, fields in mine.items()
        for key, value in (fields.items() if isinstance(fields, dict) else [])
        if not isinstance(theirs.get(section), dict) or theirs[section].get(key) != value
    ] + [
        f"space.{key}: only in the study"
        for key in (theirs.get("space") or {})
        if key not in mine["space"]
    ]
    raise StorageError(
        f"study {cfg.study.name!r} was created with a different trial definition "
        f"({'; '.join(diffs[:3])}{' ...' if len(diffs) > 3 else ''}); "
        "use a new study name, or restore the original data/train/baseline/space"
    )


def trials_counted(study: optuna.Study) -> int:
    """Trials toward the study's n_trials cap: all, except failures that were retried."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


def default_threads(workers: int) -> int:
    """Intra-op threads per worker so that workers x threads <= cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


@dataclass
class Hooks:
    """Progress callbacks for a worker; all optional."""

    on_trial_start: Callable[[int], None] | None = None
    on_epoch: Callable[[optuna.Trial, EpochMetrics], None] | None = None
    on_trial_end: Callable[[optuna.Study, FrozenTrial], None] | None = None


def run_worker(
    cfg: StudyConfig, url: str, *, workers: int = 1, hooks: Hooks | None = None
) -> optuna.Study:
    """Run trials until the study holds cfg.study.n_trials of them (shared cap across workers)."""
    hooks = hooks or Hooks()
    torch.set_num_threads(cfg.train.threads or default_threads(workers))
    data = load_task(cfg.data, cfg.study.seed, data_path=config_mod.resolve_data_path(cfg))
    study = open_study(cfg, url, data=data)
    objective = Objective(cfg, data, artifact_store=storage_mod.artifact_store(cfg), on_epoch=hooks.on_epoch)

    def after(study: optuna.Study, trial: FrozenTrial) -> None:
        if hooks.on_trial_end is not None:
            hooks.on_trial_end(study, trial)

    while trials_counted(study) < cfg.study.n_trials:
        if hooks.on_trial_start is not None:
            hooks.on_trial_start(trials_counted(study))
        # catch=(Exception,): a bad trial is recorded as FAIL with its reason; the worker carries on
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[after], gc_after_trial=False)
    return study
