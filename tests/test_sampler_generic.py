"""Optuna's own sampler suites, run on the CycleSampler as a user's study would exercise it."""

from __future__ import annotations

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
