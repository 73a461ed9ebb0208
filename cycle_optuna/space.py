"""Search space: study-file [space] <-> Optuna distributions, and the hidden/heads constraint."""

from __future__ import annotations

import dataclasses
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from cycle_optuna.config import Hyperparams, ParamSpace, StudyConfig


class InvalidCombination(ValueError):
    """A sampled set of parameters the model cannot be built from."""


def distribution(p: ParamSpace) -> BaseDistribution:
    """The Optuna distribution of one [space] entry; numeric choice lists are ordered categoricals."""
    if p.choices is not None:
        return CategoricalDistribution(list(p.choices))
    if isinstance(p.low, int) and isinstance(p.high, int):
        return IntDistribution(p.low, p.high, log=p.log, step=int(p.step or 1))
    return FloatDistribution(float(p.low), float(p.high), log=p.log, step=p.step)


def distributions(cfg: StudyConfig) -> dict[str, BaseDistribution]:
    """Every searched parameter's distribution, in study-file order."""
    return {p.name: distribution(p) for p in cfg.space}


def suggest(trial: optuna.Trial, cfg: StudyConfig) -> Hyperparams:
    """Ask the trial for every searched parameter; the rest come from [baseline]."""
    values = {}
    for p in cfg.space:
        try:
            if p.choices is not None:
                values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            elif isinstance(p.low, int) and isinstance(p.high, int):
                values[p.name] = trial.suggest_int(p.name, p.low, p.high, log=p.log, step=int(p.step or 1))
            else:
                values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
        except ValueError as e:  # a value fixed for this trial (enqueue_trial) that the space cannot hold
            raise InvalidCombination(f"{p.name}: {e} (a value enqueued for this trial outside the space?)") from None
        v = values[p.name]
        if (v not in p.choices) if p.choices is not None else not (p.low <= v <= p.high):
            # Optuna runs an enqueued value outside the space with only a warning
            raise InvalidCombination(f"{p.name}: {v!r} is outside the space "
                                     f"({list(p.choices) if p.choices is not None else f'[{p.low}, {p.high}]'}; "
                                     "a value enqueued for this trial outside the space?)")
    return to_hyperparams(cfg, values)


def to_hyperparams(cfg: StudyConfig, values: dict[str, Any]) -> Hyperparams:
    """Baseline with `values` applied; raises InvalidCombination if heads do not divide hidden."""
    hp = dataclasses.replace(cfg.baseline, **values)
    if hp.hidden_dim % hp.n_heads:
        raise InvalidCombination(
            f"n_heads={hp.n_heads} does not divide hidden_dim={hp.hidden_dim}"
        )
    return hp
