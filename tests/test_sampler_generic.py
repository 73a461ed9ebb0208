"""Optuna's own sampler suites, run on the CycleSampler as a user's study would exercise it."""

from __future__ import annotations

import optuna
import pytest
from optuna.testing.pytest_samplers import (
    BasicSamplerTestCase,
    RelativeSamplerTestCase,
    SingleOnlySamplerTestCase,
)

from cycle_optuna.sampler import CycleSampler


class TestCycleSampler(BasicSamplerTestCase, RelativeSamplerTestCase, SingleOnlySamplerTestCase):
    @pytest.fixture
    def sampler(self):
        return lambda: CycleSampler(seed=0)


class TestCycleSamplerWithBaseline(BasicSamplerTestCase, RelativeSamplerTestCase):
    @pytest.fixture
    def sampler(self):
        return lambda: CycleSampler(baseline={"x": 1, "y": 1, "z": 0.5}, seed=0, plateau_cycles=2)


def _configs(study) -> list[tuple]:
    return [tuple(sorted((k, (type(v).__name__, v)) for k, v in t.params.items())) for t in study.trials]


def test_a_conditional_space_does_not_rerun_a_configuration_through_params_it_never_suggested():
    """Moves on a param the incumbent's branch never suggests would rerun the incumbent."""
    def objective(t):
        if t.suggest_categorical("k", ["a", "b"]) == "a":
            return 1 + t.suggest_float("u", 0, 1)
        return (t.suggest_float("v", 0, 1) - 0.5) ** 2

    study = optuna.create_study(sampler=CycleSampler(seed=0, baseline={"k": "a", "u": 0.5, "v": 0.1}))
    study.optimize(objective, n_trials=30)
    configs = _configs(study)
    # 16 of 30 trials repeated one before; a branch switch may still land on a configuration run before
    assert len(set(configs)) >= len(configs) - 6


def test_a_move_that_a_wrapping_sampler_overrode_counts_as_taken():
    """PartialFixedSampler fixes c: the move 'c b->a' ran as c = b; proposing it again would run the same trial."""
    inner = CycleSampler(seed=0, baseline={"x": 0.0, "y": 0})
    study = optuna.create_study(sampler=optuna.samplers.PartialFixedSampler({"c": "b"}, inner))
    study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.3) ** 2 + (t.suggest_int("y", 0, 5) - 2) ** 2
                   + (t.suggest_categorical("c", ["a", "b"]) == "b"), n_trials=25)
    moves = [t.user_attrs["cycle_move"] for t in study.trials]
    assert moves.count("c b->a") <= 1, moves  # 19 of 25 trials were that move
    configs = _configs(study)
    assert len(set(configs)) >= len(configs) - 2


def test_without_generic_moves_params_without_a_role_are_the_fallbacks():
    study = optuna.create_study(sampler=CycleSampler(seed=0, generic_moves=False, baseline={"x": 0.5, "y": 2}))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_int("y", 0, 5), n_trials=4)
    moves = [t.user_attrs["cycle_move"] for t in study.trials]
    assert not any(m.startswith(("x ", "y ")) for m in moves), moves
