"""cycle-optuna: tune small transformers in improvement cycles with Optuna."""

from cycle_optuna.api import best_params, best_trial, cycles, load_best_model, load_study
from cycle_optuna.config import StudyConfig, load as load_config
from cycle_optuna.errors import ConfigError, CycleOptunaError, DataError, StorageError
from cycle_optuna.sampler import CycleSampler

__all__ = [
    "ConfigError",
    "CycleOptunaError",
    "CycleSampler",
    "DataError",
    "StorageError",
    "StudyConfig",
    "best_params",
    "best_trial",
    "cycles",
    "load_best_model",
    "load_config",
    "load_study",
]
