"""Samplers: the CycleSampler, the reference's own schedule, and the study-file factory."""

from cycle_optuna.sampler._cycle import MOVE_ATTR, PARENT_ATTR, REASON_ATTR, CycleSampler
from cycle_optuna.sampler._moves import Roles
from cycle_optuna.sampler._reference import PerTrialSeeded, ReferenceScheduleSampler, make_sampler

__all__ = [
    "MOVE_ATTR",
    "PARENT_ATTR",
    "REASON_ATTR",
    "CycleSampler",
    "PerTrialSeeded",
    "ReferenceScheduleSampler",
    "Roles",
    "make_sampler",
]
