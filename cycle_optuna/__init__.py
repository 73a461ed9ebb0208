"""cycle-optuna: tune small transformers in improvement cycles with Optuna."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cycle_optuna.api import best_params, best_trial, cycles, load_best_model, load_study, run_study
    from cycle_optuna.config import StudyConfig, load as load_config
    from cycle_optuna.errors import ConfigError, CycleOptunaError, DataError, StorageError
    from cycle_optuna.refitting import refit
    from cycle_optuna.sampler import CycleSampler

# Re-exports resolved on first use, so `cycle-optuna --help` and `status` do not pay for Optuna,
# SQLAlchemy or torch before they need them.
_EXPORTS = {
    "ConfigError": "errors", "CycleOptunaError": "errors", "DataError": "errors", "StorageError": "errors",
    "CycleSampler": "sampler", "StudyConfig": "config", "load_config": ("config", "load"),
    "best_params": "api", "best_trial": "api", "cycles": "api", "load_best_model": "api", "load_study": "api",
    "run_study": "api", "refit": "refitting",
}

__all__ = sorted(_EXPORTS)
# modules the docs name as cycle_optuna.<module>.<function>
_SUBMODULES = {"api", "export", "predict", "report", "refitting", "dashboard", "config", "data", "storage", "sampler"}


def __getattr__(name: str) -> Any:
    if name == "__version__":  # the installed package's, read when asked
        from importlib.metadata import version

        return version("cycle-optuna")
    where = _EXPORTS.get(name)
    if where is None:
        if name in _SUBMODULES:  # `import cycle_optuna` then cycle_optuna.export.frame(...), as the docs write it
            return importlib.import_module(f"cycle_optuna.{name}")
        raise AttributeError(f"module 'cycle_optuna' has no attribute {name!r}")
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(f"cycle_optuna.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """What `dir(cycle_optuna)` and an editor's completion list: the lazy exports and the modules the
    docs name, beside what the module holds already (without this, only its own few globals)."""
    own = {n for n in globals() if not n.startswith("_")} - {"annotations", "importlib", "Any", "TYPE_CHECKING"}
    return sorted({*own, *_EXPORTS, *_SUBMODULES})
