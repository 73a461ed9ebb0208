"""CycleSampler: improvement cycles (local moves from the incumbent) as an Optuna sampler."""

from __future__ import annotations

import copy
import datetime
import heapq
import math
import re
import warnings
import threading
import time
from collections import OrderedDict
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from optuna.distributions import BaseDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler, CmaEsSampler, RandomSampler, TPESampler
from optuna.storages import InMemoryStorage
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from cycle_optuna import optuna_internals as internals
from cycle_optuna.sampler._history import (
    FIXED_ATTR, PROPOSAL_ATTR, History, HistoryCache, move_key, ref_to, same_object,
)
from cycle_optuna.sampler._moves import Roles, coerce, contains, repair, step_value
from cycle_optuna.sampler._rules import MULTIPLICATIVE, Planner, Settings

PARENT_ATTR, MOVE_ATTR, REASON_ATTR = "cycle_parent", "cycle_move", "cycle_reason"
_WAIT_RECENT_S = 10.0  # only trials created this recently may still be writing their proposal
_WAIT_S = {True: 0.25, False: 2.0}  # longest wait for them: in-memory (threads) / shared storages
_MAX_REDECIDE = 3  # decisions taken again when another trial claimed the same move meanwhile
_MAX_ENTRIES = 1024
_VIEW_BEST, _VIEW_RECENT = 30, 90  # the trials an exploration's fallback sees: the best and the latest


@dataclass
class _Entry:
    payload: dict[str, Any]
    space: dict[str, BaseDistribution] | None  # relative search space; None until needed
    fallback: BaseSampler | None = None  # this trial's fallback, when built per trial
    view: Study | None = None  # what the fallback sees of the study, when it samples
    owner: Callable[[], Any] | None = None  # the storage the trial is in (keys hold only its id)

    @property
    def from_fallback(self) -> bool:
        """An exploration the fallback samples (a local one is a configuration of our own)."""
        return self.payload.get("kind") == "explore" and self.payload.get("scope") != "local"


def trial_seed(seed: int, number: int) -> int:
    """The seed of the sampler built for trial `number` of a study seeded `seed`: the same in any
    process, another for every trial."""
    return (seed * 1_000_003 + number) % 2**31


def make_tpe(seed: int | None, *, n_startup_trials: int = 10, multivariate: bool | None = True) -> BaseSampler:
    """TPE as this project builds it. Multivariate (the default): an exploration sees the whole
    space jointly, strings and numbers together. Constant liar: workers that ask while others'
    trials run get other configurations (one worker alone samples exactly as without it).
    ``multivariate=None`` is Optuna's own default."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=multivariate, constant_liar=True)


class _BoundedStudy(Study):
    """A study whose trial list is a fixed subset: what the fallback sees in an exploration."""

    def __init__(self, study: Study, trials: list[FrozenTrial]) -> None:  # no super(): nothing to load
        self.__dict__.update(study.__dict__)
        self._view_trials = trials

    def _get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        trials = self._view_trials if states is None else [t for t in self._view_trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)


def sampler_name(sampler: BaseSampler) -> str:
    """Short name used in explanations: tpe, random, cmaes, or the class name."""
    for cls, name in ((TPESampler, "tpe"), (RandomSampler, "random"), (CmaEsSampler, "cmaes")):
        if isinstance(sampler, cls):
            return name
    return type(sampler).__name__


class CycleSampler(BaseSampler):
    """Tune like a researcher in improvement cycles, as an Optuna sampler.

    Cycle 1 (trial 0) is ``baseline``. Each later trial starts from the incumbent (the best
    finished trial, where "better" means better by more than ``noise_margin``) and changes one
    parameter: lr x/÷ ``lr_factor``, layers +-1, hidden to the next/previous choice (heads kept
    dividing it), dropout +-, batch size to the next/previous choice, other numeric parameters
    up/down, a categorical to its next untried choice (a true/false switch flipped once, early).
    A move that improved is repeated (with a larger step after two in a row); one that
    did not sends the search back to the incumbent to try the opposite, then the next move, then
    the same moves with smaller steps. A ``diagnosis`` user attr on trials, when present, orders
    the moves. After ``plateau_cycles`` trials without improvement, or once every move is taken,
    the search explores: twice around the incumbent (several parameters moved a step each), then
    one trial from ``fallback`` over the whole space. Every decision is derived from the study's
    trials, so many workers can share one study; running trials count as taken.

    Each proposed trial gets user attrs ``cycle_parent`` (the parent's cycle number, trial number + 1; or None), ``cycle_move``
    and ``cycle_reason`` (one sentence). See ``docs/sampler.md`` for the full rules.

    Args:
        baseline: Parameter values of the first trial; missing ones come from ``fallback``.
        seed: Seed of the default fallback sampler (the rules themselves are deterministic).
        lr_factor: Multiplicative lr step, > 1.
        noise_margin: Relative improvement that counts (0.002 = 0.2% of the incumbent value).
        plateau_cycles: Trials without improvement before one exploration trial, >= 1.
        fallback: Sampler for global exploration trials and parameters the rules do not move
            (all non-role parameters if ``generic_moves`` is False):
            a sampler instance, or a function ``seed -> sampler`` called once per trial with a
            seed derived from ``seed`` and the trial number (deterministic for a given seed and
            history, also across restarts). Defaults to ``TPESampler``, built that way.
        roles: Which parameter is the lr, layers, hidden, heads, dropout, batch size and patch
            length (a ``Roles``).
        generic_moves: Move numeric parameters that have no role by stepping them up/down.
        ceilings: Parameter -> the value at and above which every value trains the same (the
            study's worker passes the batch size's: its largest training split, since a batch
            never holds more series than the split): a move between two such values is a
            configuration already tried, and is not made.
    """

    def __init__(
        self,
        *,
        baseline: Mapping[str, Any] | None = None,
        seed: int | None = None,
        lr_factor: float = 2.0,
        noise_margin: float = 0.002,
        plateau_cycles: int = 6,
        fallback: BaseSampler | Callable[[int | None], BaseSampler] | None = None,
        roles: Roles | None = None,
        generic_moves: bool = True,
        ceilings: Mapping[str, float] | None = None,
    ) -> None:
        if baseline is not None and not isinstance(baseline, Mapping):
            raise ValueError(f"baseline must map parameter names to values, but got {baseline=}.")
        if isinstance(lr_factor, bool) or not isinstance(lr_factor, (int, float)) or not (
            math.isfinite(lr_factor) and lr_factor > 1
        ):
            raise ValueError(f"lr_factor must be a finite number > 1, but got {lr_factor=}.")
        if isinstance(noise_margin, bool) or not isinstance(noise_margin, (int, float)) or not (
            math.isfinite(noise_margin) and noise_margin >= 0
        ):
            raise ValueError(f"noise_margin must be a finite number >= 0, but got {noise_margin=}.")
        if isinstance(plateau_cycles, bool) or not isinstance(plateau_cycles, int) or plateau_cycles < 1:
            raise ValueError(f"plateau_cycles must be an integer >= 1, but got {plateau_cycles=}.")
        if fallback is not None and not (isinstance(fallback, BaseSampler) or callable(fallback)):
            raise ValueError(f"fallback must be an optuna sampler or a function seed -> sampler, but got {fallback=}.")
        if roles is not None and not isinstance(roles, Roles):
            raise ValueError(f"roles must be a cycle_optuna.sampler.Roles, but got {roles=}.")
        if ceilings is not None and not (isinstance(ceilings, Mapping) and all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for k, v in ceilings.items())):
            raise ValueError(f"ceilings must map parameter names to finite numbers, but got {ceilings=}.")
        self._baseline = dict(baseline or {})
        self._lr_factor = float(lr_factor)
        self._plateau_cycles = plateau_cycles
        self._seed = seed
        if isinstance(fallback, BaseSampler):
            self._fallback, self._make_fallback = fallback, None
        else:
            self._make_fallback = fallback if fallback is not None else make_tpe
            self._fallback = self._make_fallback(seed)
        self._roles = roles or Roles()
        self._generic_moves = bool(generic_moves)
        self._history = HistoryCache(self._movable, float(noise_margin), ceilings)
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_entries"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def reseed_rng(self) -> None:
        self._fallback.reseed_rng()

    @property
    def ceilings(self) -> dict[str, float]:
        """Parameter -> the value at and above which every value trains the same (see the class doc)."""
        return dict(self._history._ceilings)

    # -- BaseSampler -------------------------------------------------------------------------
    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        if len(study.directions) > 1:
            # Optuna has created the trial already: end it rather than leave it RUNNING forever
            internals.storage_of(study).set_trial_state_values(internals.trial_id_of(trial), TrialState.FAIL)
            self._raise_error_if_multi_objective(study)
        self._fallback.before_trial(study, trial)
        self._entry(study, trial, wait=True)
        self._renumber_retry(study, trial)

    def _renumber_retry(self, study: Study, trial: FrozenTrial) -> None:
        """A retry (Optuna's retry callback copies the failed trial's attrs) runs the same move,
        but its reason began with the failed cycle's number: say which cycle it retries."""
        failed, reason = trial.system_attrs.get("failed_trial"), trial.user_attrs.get(REASON_ATTR)
        own = f"cycle {trial.number + 1}: "
        if not isinstance(failed, int) or not isinstance(reason, str) or reason.startswith(own):
            return
        rest = reason.split(": ", 1)[1] if re.match(r"cycle \d+: ", reason) else reason
        rest = re.sub(r"^retry of cycle \d+; ", "", rest)  # a retry of a retry: one mark
        reason = f"{own}retry of cycle {failed + 1}; {rest}"
        internals.storage_of(study).set_trial_user_attr(internals.trial_id_of(trial), REASON_ATTR, reason)
        if isinstance(trial.user_attrs, dict):
            trial.user_attrs[REASON_ATTR] = reason

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        self._raise_error_if_multi_objective(study)
        entry = self._entry(study, trial)
        if entry.space is None:
            entry.space = self._relative_space(self._view(study, trial))
        return dict(entry.space)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        self._raise_error_if_multi_objective(study)
        if not search_space:
            return {}
        entry = self._entry(study, trial)
        if entry.from_fallback:
            return self._explore_relative(study, trial, search_space)
        params = entry.payload.get("params") or {}
        return {k: v for k, v in params.items() if k in search_space and contains(search_space[k], v)}

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        self._raise_error_if_multi_objective(study)
        entry = self._entry(study, trial)
        payload = entry.payload
        kind = payload.get("kind")
        if not entry.from_fallback:
            value = coerce(param_distribution, (payload.get("params") or {}).get(param_name))
            if value is not None:
                return value
            base = coerce(param_distribution, self._baseline.get(param_name))
            # Uncovered params keep the baseline only in the startup trials; later the fallback has them.
            if base is not None and (kind in ("baseline", "lazy") or self._movable(param_name, param_distribution)):
                if kind == "lazy" and param_name == payload.get("param"):
                    role = self._roles.role_of(param_name)
                    moved = step_value(
                        param_distribution, base, int(payload.get("dir", 1)), 1.0,
                        factor=self._lr_factor if role == "lr" else 2.0,
                        multiplicative=role in MULTIPLICATIVE,
                    )
                    base = base if moved is None else moved
                return repair(self._roles, param_name, param_distribution, base, trial.params)
        value = self._fallback_for(study, trial).sample_independent(
            self._fallback_view(study, trial), trial, param_name, param_distribution
        )
        return repair(self._roles, param_name, param_distribution, value, trial.params)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._fallback.after_trial(study, trial, state, values)
        with self._lock:
            self._entries.pop((id(internals.storage_of(study)), internals.trial_id_of(trial)), None)

    # -- decisions ---------------------------------------------------------------------------
    def _fallback_for(self, study: Study, trial: FrozenTrial) -> BaseSampler:
        """The fallback for this trial: built per trial, seeded from `seed` and the trial number,
        so that a resumed study proposes what an uninterrupted one would have."""
        if self._make_fallback is None or self._seed is None:
            return self._fallback
        entry = self._entry(study, trial)
        if entry.fallback is None:
            entry.fallback = self._make_fallback(trial_seed(self._seed, trial.number))
        return entry.fallback

    def _fallback_view(self, study: Study, trial: FrozenTrial) -> Study:
        """The study as the fallback sees it: all of it while small, then its best trials and
        its latest ones, so that an exploration costs the same at 200 trials and at 10,000."""
        entry = self._entry(study, trial)
        if entry.view is None:
            trials = internals.storage_of(study).get_all_trials(internals.study_id_of(study), deepcopy=False)
            if len(trials) <= _VIEW_BEST + _VIEW_RECENT:
                entry.view = study
            else:
                done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
                sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
                scored = [t for t in done if t.state == TrialState.COMPLETE and t.values and math.isfinite(t.values[0])]
                best = heapq.nsmallest(_VIEW_BEST, scored, key=lambda t: sign * t.values[0])
                keep = {t.number: t for t in [*best, *done[-_VIEW_RECENT:]]}
                entry.view = _BoundedStudy(study, [keep[k] for k in sorted(keep)])
        return entry.view

    def _movable(self, name: str, dist: BaseDistribution) -> bool:
        return self._generic_moves or self._roles.role_of(name) is not None

    def _relative_space(self, hist: History) -> dict[str, BaseDistribution]:
        f = hist.fold
        return {k: d for k, d in f.space.items() if k not in f.conflicts and not d.single() and self._movable(k, d)}

    def _view(self, study: Study, trial: FrozenTrial) -> History:
        # The whole study, also inside HyperbandPruner's bracket view: the cycle is one
        # sequence across brackets and duplicates must be avoided study-wide.
        return self._history.view(internals.storage_of(study), internals.study_id_of(study), study.direction, trial.number)

    def _entry(self, study: Study, trial: FrozenTrial, *, wait: bool = False) -> _Entry:
        storage = internals.storage_of(study)
        key = (id(storage), internals.trial_id_of(trial))
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and same_object(entry.owner, storage):  # not a dead storage's trial of that id
            return entry
        stored = trial.system_attrs.get(PROPOSAL_ATTR)
        if isinstance(stored, dict):
            entry = _Entry(stored, None)
        else:
            entry = self._decide(study, trial, wait)
        entry.owner = ref_to(storage)
        with self._lock:
            self._entries[key] = entry
            while len(self._entries) > _MAX_ENTRIES:
                self._entries.popitem(last=False)
        return entry

    def _decide(self, study: Study, trial: FrozenTrial, wait: bool) -> _Entry:
        self._raise_error_if_multi_objective(study)
        hist = self._view(study, trial)
        if wait and self._wait_for_earlier(study, trial, hist):
            hist = self._view(study, trial)
        settings = Settings(
            roles=self._roles,
            baseline=self._baseline,
            lr_factor=self._lr_factor,
            plateau_cycles=self._plateau_cycles,
            fallback_name=sampler_name(self._fallback),
            minimize=study.direction != StudyDirection.MAXIMIZE,
            movable=self._movable,
            generic_moves=self._generic_moves,
            seed=self._seed,
        )
        fixed = trial.system_attrs.get(FIXED_ATTR)
        for attempt in range(_MAX_REDECIDE + 1):
            planner = Planner(settings, hist, trial.number)
            if isinstance(fixed, dict) and fixed:
                payload, reason = planner.enqueued(fixed)
                self._write(study, trial, payload, reason)
                break
            payload, reason = planner.decide()
            self._write(study, trial, payload, reason)
            # Written, then checked: of two workers that claim the same move at once, at least
            # one sees the other's claim here, and it decides again.
            claims = _claims(payload, hist.key)
            if not claims or attempt == _MAX_REDECIDE:
                break
            hist = self._view(study, trial)
            if not any(hist.known(k) for k in claims):
                break
        return _Entry(payload, dict(planner.space))

    def _wait_for_earlier(self, study: Study, trial: FrozenTrial, hist: History) -> bool:
        """Wait briefly for earlier running trials that have not written their proposal yet,
        so that two workers asking at the same moment do not pick the same move."""
        now = datetime.datetime.now()

        def undecided(t: FrozenTrial) -> bool:
            return (
                t.number < trial.number
                and t.state == TrialState.RUNNING
                and PROPOSAL_ATTR not in t.system_attrs
                and not t.params
                and t.datetime_start is not None
                and abs((now - t.datetime_start).total_seconds()) < _WAIT_RECENT_S
            )

        storage = internals.storage_of(study)
        waiting = [internals.trial_id_of(t) for t in hist.pending if undecided(t)]
        if not waiting:
            return False
        deadline = time.monotonic() + _WAIT_S[isinstance(storage, InMemoryStorage)]
        delay = 0.005
        while waiting and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            waiting = [tid for tid in waiting if undecided(storage.get_trial(tid))]
        return True

    def _write(self, study: Study, trial: FrozenTrial, payload: dict[str, Any], reason: str) -> None:
        storage = internals.storage_of(study)
        storage.set_trial_system_attr(internals.trial_id_of(trial), PROPOSAL_ATTR, payload)
        parent = payload.get("parent")
        parent = None if parent is None else int(parent) + 1  # shown as a cycle number, like every "cycle N"
        for key, value in ((PARENT_ATTR, parent), (MOVE_ATTR, payload["move"]), (REASON_ATTR, reason)):
            storage.set_trial_user_attr(internals.trial_id_of(trial), key, value)
            if isinstance(trial.user_attrs, dict):
                trial.user_attrs[key] = value  # so the objective sees them without a reload

    def _explore_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        fb = self._fallback_for(study, trial)
        view = self._fallback_view(study, trial)
        if isinstance(fb, TPESampler):
            fb_space = search_space  # TPE models any space jointly; it skips trials that lack a param
        else:
            # The shared instance infers the space: no randomness there, and it keeps its cache.
            fb_space = {k: d for k, d in self._fallback.infer_relative_search_space(study, trial).items() if k in search_space}
        params = dict(fb.sample_relative(view, trial, fb_space)) if fb_space else {}
        for name, dist in search_space.items():
            if name not in params:
                params[name] = fb.sample_independent(view, trial, name, dist)
        heads, hidden = self._roles.heads, self._roles.hidden
        name = heads if heads in params else hidden  # heads follows hidden when both are new
        if name in params:
            params[name] = repair(self._roles, name, search_space[name], params[name], {**trial.params, **params})
        return params


def _claims(payload: Mapping[str, Any], key: Callable[[Mapping[str, Any]], tuple]) -> list[tuple]:
    """The history keys a proposal holds, for moves and local explorations; the baseline, an
    enqueued trial and a fallback's exploration claim nothing. `key`: the history's own
    (:meth:`History.key`)."""
    kind, params = payload.get("kind"), payload.get("params") or {}
    keys = [key(params)] if params and kind in ("move", "explore") else []
    if kind in ("move", "lazy") and payload.get("param"):
        param, direction = payload["param"], int(payload.get("dir", 0) or 0)
        keys.append(move_key(payload.get("parent"), param, direction, float(payload.get("scale", 1.0) or 1.0), params.get(param)))
    return keys
