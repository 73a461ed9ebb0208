"""The reference's own schedule, kept for side-by-side comparison, and the study-file factory."""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence

from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler, CmaEsSampler, RandomSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from cycle_optuna import optuna_internals as internals
from cycle_optuna.config import SamplerConfig
from cycle_optuna.sampler._cycle import MOVE_ATTR, PARENT_ATTR, REASON_ATTR, CycleSampler, make_tpe, trial_seed
from cycle_optuna.sampler._moves import Roles, coerce, repair, step_value


class ReferenceScheduleSampler(BaseSampler):
    """The reference summary's rule: every cycle multiplies lr by ``lr_factor`` and grows
    capacity (layers +1; hidden to the next choice once layers are at their maximum), starting
    from ``baseline`` and never backing off. Trial ``n`` is the schedule applied ``n`` times.

    Parameters outside the schedule keep their baseline value, or come from ``fallback``
    (default ``RandomSampler(seed)``) when the baseline lacks them.
    """

    def __init__(
        self,
        *,
        baseline: Mapping[str, Any],
        seed: int | None = None,
        lr_factor: float = 2.0,
        roles: Roles | None = None,
        fallback: BaseSampler | None = None,
    ) -> None:
        if not isinstance(baseline, Mapping):
            raise ValueError(f"baseline must map parameter names to values, but got {baseline=}.")
        if isinstance(lr_factor, bool) or not isinstance(lr_factor, (int, float)) or not (
            math.isfinite(lr_factor) and lr_factor > 1
        ):
            raise ValueError(f"lr_factor must be a finite number > 1, but got {lr_factor=}.")
        self._baseline = dict(baseline)
        self._lr_factor = float(lr_factor)
        self._roles = roles or Roles()
        self._fallback = fallback if fallback is not None else RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self._fallback.reseed_rng()

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._raise_error_if_multi_objective(study)
        n, f = trial.number, self._lr_factor
        if n == 0:
            parent, move, reason = None, "baseline", "cycle 1: baseline configuration"
        else:
            lr = "doubled lr" if f == 2 else f"multiplied lr by {f:g}"
            parent, move = n, f"lr x{f:g}, capacity up"  # the previous cycle, numbered like "cycle N"
            reason = f"cycle {n + 1}: reference schedule: {lr} and grew capacity from cycle {n} (no backing off)"
        for key, value in ((PARENT_ATTR, parent), (MOVE_ATTR, move), (REASON_ATTR, reason)):
            internals.storage_of(study).set_trial_user_attr(internals.trial_id_of(trial), key, value)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        self._raise_error_if_multi_objective(study)
        dist, n, roles = param_distribution, trial.number, self._roles
        base = coerce(dist, self._baseline.get(param_name))
        if base is None:
            value = self._fallback.sample_independent(study, trial, param_name, dist)
            return repair(roles, param_name, dist, value, trial.params)
        role = roles.role_of(param_name)
        value = base
        if n and role == "lr" and isinstance(dist, FloatDistribution):
            value = min(base * self._lr_factor**n, dist.high)
            value = coerce(dist, value) if coerce(dist, value) is not None else base
        elif n and role == "layers":
            value = self._walk(dist, base, n)
        elif n and role == "hidden":
            value = self._walk(dist, base, n - self._layer_room(study, trial))
        return repair(roles, param_name, dist, value, trial.params)

    @staticmethod
    def _walk(dist: BaseDistribution, value: Any, steps: int) -> Any:
        for _ in range(max(0, steps)):
            nxt = step_value(dist, value, +1, 1.0, factor=2.0, multiplicative=False)
            if nxt is None:
                break
            value = nxt
        return value

    def _layer_room(self, study: Study, trial: FrozenTrial) -> int:
        """Cycles the layers take to reach their maximum; hidden grows after that."""
        name = self._roles.layers
        dist = trial.distributions.get(name) if name else None
        if dist is None and name:
            for t in reversed(internals.storage_of(study).get_all_trials(internals.study_id_of(study), deepcopy=False)):
                if name in t.distributions:
                    dist = t.distributions[name]
                    break
        base = coerce(dist, self._baseline.get(name)) if dist is not None else None
        if base is None:
            return 0
        room = 0
        while (base := step_value(dist, base, +1, 1.0, factor=2.0, multiplicative=False)) is not None:
            room += 1
        return room


def make_sampler(cfg: SamplerConfig, *, baseline: Mapping[str, Any], seed: int,
                 ceilings: Mapping[str, float] | None = None) -> BaseSampler:
    """The sampler a study file's [sampler] section names, seeded by the study seed; `ceilings`: the
    CycleSampler's (values of a parameter that all train the same)."""
    if cfg.type == "cycle":
        return CycleSampler(
            baseline=baseline,
            seed=seed,
            ceilings=ceilings,
            lr_factor=cfg.lr_factor,
            noise_margin=cfg.noise_margin,
            plateau_cycles=cfg.plateau_cycles,
            fallback=functools.partial(_fallback, cfg.fallback, cfg),  # built per trial: reproducible on resume
        )
    if cfg.type == "reference":
        return ReferenceScheduleSampler(baseline=baseline, seed=seed, lr_factor=cfg.lr_factor)
    return _plain(cfg.type, cfg, seed)


def _fallback(kind: str, cfg: SamplerConfig, seed: int | None) -> BaseSampler:
    """The cycle sampler's exploration sampler: TPE models the whole space jointly (multivariate),
    as the CycleSampler's own default does."""
    return make_tpe(seed, n_startup_trials=cfg.n_startup_trials) if kind == "tpe" else _plain(kind, cfg, seed)


def _plain(kind: str, cfg: SamplerConfig, seed: int | None) -> BaseSampler:
    if kind == "tpe":  # Optuna's default TPE, as a `type = "tpe"` study has always had, with constant liar
        return make_tpe(seed, n_startup_trials=cfg.n_startup_trials, multivariate=None)
    if kind == "random":
        return RandomSampler(seed=seed)
    if kind == "cmaes":
        # Categorical params (hidden, heads, batch) are sampled independently by design.
        return CmaEsSampler(
            n_startup_trials=cfg.n_startup_trials,
            seed=seed,
            independent_sampler=RandomSampler(seed=seed),
            warn_independent_sampling=False,
        )
    raise ValueError(f"sampler type must be one of cycle, reference, tpe, random, cmaes, but got {kind=}.")



class PerTrialSeeded(BaseSampler):
    """Optuna's sampler `make(seed)` built afresh for every trial, its seed derived from `seed` and
    the trial number, as the CycleSampler builds its fallback.

    One sampler seeded once per process draws the same sequence in every process: two workers on
    one study, or a study resumed by a second `run`, would run the first one's configurations again.
    Seeded per trial, trial n gets the same draw in any process, so a resumed study proposes what
    an uninterrupted one would have, and concurrent workers, holding other trial numbers, draw
    other configurations."""

    _MAX_BUILT = 256  # samplers of trials still asking; a trial's is dropped when it ends

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._built: OrderedDict[tuple[int, int], BaseSampler] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_built"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _for(self, study: Study, trial: FrozenTrial) -> BaseSampler:
        key = (id(internals.storage_of(study)), internals.trial_id_of(trial))
        with self._lock:
            sampler = self._built.get(key)
            if sampler is None:
                sampler = self._built[key] = self._make(trial_seed(self._seed, trial.number))
                while len(self._built) > self._MAX_BUILT:
                    self._built.popitem(last=False)
            return sampler

    def reseed_rng(self) -> None:
        pass  # every trial's sampler is seeded by its number: nothing is shared between trials

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._for(study, trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._for(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._for(study, trial).after_trial(study, trial, state, values)
        with self._lock:
            self._built.pop((id(internals.storage_of(study)), internals.trial_id_of(trial)), None)
