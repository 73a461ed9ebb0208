"""What the CycleSampler knows, folded from the study's trials, with a per-process cache.

Finished trials never change, so the leading run of finished trials is folded once and kept;
only the trials after the first unfinished one are folded again on each call. Asking is
therefore O(new trials), not O(all trials), apart from the storage's own ``get_all_trials``.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from cycle_optuna.sampler._moves import compatible, config_key, norm

PROPOSAL_ATTR = "cycle:proposal"  # system attr: the decision, as JSON, written before sampling
FIXED_ATTR = "fixed_params"  # Optuna's system attr for enqueued trials


def move_key(parent: int | None, param: str | None, direction: int, scale: float = 1.0, value: Any = None) -> tuple:
    """A move as a claim: from this trial, this parameter, this way, this far (or, for unordered
    choices, to this choice). It names the same trial whether or not the parent's other params
    were known when it was decided, which its config key alone does not."""
    return ("move", parent, param, direction, float(scale), None if direction else norm(value))


def move_kind(param: str, direction: int, value: Any) -> tuple:
    """What a move does, wherever it starts: a direction, or for unordered choices the choice."""
    return (param, direction) if direction else (param, "=", norm(value))


@dataclass
class Rec:
    """One trial as the rules see it."""

    number: int
    state: TrialState
    value: float | None  # finite objective value of a COMPLETE trial, else None
    config: dict[str, Any]  # every rule-covered param (the proposal, overridden by actual params)
    diagnosis: str | None
    kind: str  # baseline | move | explore | lazy | enqueued | "" (not proposed by us)
    parent: int | None
    param: str | None  # the parameter the move changed
    direction: int
    scale: float
    move: str
    scope: str = ""  # explorations: local (around the incumbent) | global (the fallback)
    improved: bool = False  # became the incumbent when it finished
    beaten: float | None = None  # the incumbent value it beat

    @property
    def cycle(self) -> int:
        return self.number + 1


@dataclass
class Fold:
    """The small, copyable part of the state."""

    incumbent: Rec | None = None
    base: Rec | None = None  # the first trial proposed as baseline or with params
    last_finished: Rec | None = None
    last_explore: int = -1
    explores_since: int = 0  # exploration trials after the incumbent
    n_trials: int = 0  # trials seen, WAITING ones excluded
    space: dict[str, BaseDistribution] = field(default_factory=dict)  # union, latest wins
    # names seen with incompatible distributions, or whose proposed move ran as another value (a wrapping
    # sampler such as PartialFixedSampler fixes them): the rules leave them alone
    conflicts: set[str] = field(default_factory=set)
    fails: dict[tuple, int] = field(default_factory=dict)  # move kind -> times it did not improve
    moved: set[str] = field(default_factory=set)  # parameters a move trial changed (any state)

    def copy(self) -> Fold:
        return Fold(
            self.incumbent, self.base, self.last_finished, self.last_explore, self.explores_since,
            self.n_trials, dict(self.space), set(self.conflicts), dict(self.fails), set(self.moved),
        )


@dataclass
class History:
    """A snapshot: the fold plus lookups over every trial except the one being decided."""

    fold: Fold
    _recs: dict[int, Rec]
    _tail_recs: dict[int, Rec]
    _keys: dict[tuple, Rec | None]
    _tail_keys: dict[tuple, Rec | None]
    pending: list[FrozenTrial]  # unfinished trials other than the current one
    ceilings: Mapping[str, float] | None = None  # config_key's: values that train the same share a key

    def key(self, config: Mapping[str, Any]) -> tuple:
        """`config` as this history's keys are made (:func:`config_key` with its ceilings)."""
        return config_key(config, self.ceilings)

    def rec(self, number: int | None) -> Rec | None:
        if number is None:
            return None
        return self._tail_recs.get(number) or self._recs.get(number)

    def known(self, key: tuple) -> bool:
        return key in self._tail_keys or key in self._keys

    def holder(self, key: tuple) -> Rec | None:
        """The trial that has this configuration (None if none, or only an enqueued one)."""
        return self._tail_keys.get(key) or self._keys.get(key)


def same_object(ref: Callable[[], Any] | None, obj: Any) -> bool:
    """Whether `ref` (from :func:`ref_to`) still points at `obj`: a cache keyed on id() must not
    serve a new object that took a dead one's id."""
    return ref is not None and ref() is obj


def ref_to(obj: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(obj)
    except TypeError:  # an object without weak references: held (the caches holding it are bounded)
        return lambda: obj


@dataclass
class _Cache:
    direction: StudyDirection
    owner: Callable[[], Any] | None = None  # the storage it was folded from
    fold: Fold = field(default_factory=Fold)
    recs: dict[int, Rec] = field(default_factory=dict)
    keys: dict[tuple, Rec | None] = field(default_factory=dict)
    done: int = 0  # trials 0..done-1 are finished and folded


class HistoryCache:
    """Per-process cache of folded trials, one entry per (storage, study)."""

    def __init__(self, movable: Callable[[str, BaseDistribution], bool], noise_margin: float,
                 ceilings: Mapping[str, float] | None = None) -> None:
        self._movable = movable
        self._margin = noise_margin
        self._ceilings = dict(ceilings or {})
        self._caches: dict[tuple[int, int], _Cache] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"_movable": self._movable, "_margin": self._margin, "_ceilings": self._ceilings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_movable"], state["_margin"], state.get("_ceilings"))  # type: ignore[misc]

    def better(self, a: float, b: float, direction: StudyDirection) -> bool:
        """`a` improves on `b` by more than the relative noise margin."""
        margin = self._margin * abs(b)
        if direction == StudyDirection.MAXIMIZE:
            return a > b + margin
        return a < b - margin

    def view(self, storage: BaseStorage, study_id: int, direction: StudyDirection, exclude: int) -> History:
        trials = storage.get_all_trials(study_id, deepcopy=False)
        with self._lock:
            key = (id(storage), study_id)
            cache = self._caches.get(key)
            if (
                cache is None
                or not same_object(cache.owner, storage)  # a new storage that took a dead one's id
                or cache.direction != direction
                or cache.done > len(trials)
                or (cache.done and trials[cache.done - 1].number != cache.done - 1)
            ):
                cache = self._caches[key] = _Cache(direction, ref_to(storage))
            if any(t.number != i for i, t in enumerate(trials[cache.done : cache.done + 1], cache.done)):
                trials = sorted(trials, key=lambda t: t.number)  # storages list by number; be safe
            i = cache.done
            while i < len(trials) and trials[i].state.is_finished() and trials[i].number == i:
                self._fold(cache.fold, cache.recs, cache.keys, trials[i], direction)
                i += 1
            cache.done = i
            fold, recs, keys = cache.fold.copy(), cache.recs, cache.keys
        tail_recs: dict[int, Rec] = {}
        tail_keys: dict[tuple, Rec | None] = {}
        pending = []
        for t in trials[i:]:
            if t.number == exclude:
                continue
            if not t.state.is_finished():
                pending.append(t)
            self._fold(fold, tail_recs, tail_keys, t, direction)
        return History(fold, recs, tail_recs, keys, tail_keys, pending, self._ceilings)

    def _fold(
        self, f: Fold, recs: dict[int, Rec], keys: dict[tuple, Rec | None], t: FrozenTrial, direction: StudyDirection
    ) -> None:
        if t.state == TrialState.WAITING:
            fixed = t.system_attrs.get(FIXED_ATTR)
            if isinstance(fixed, dict) and fixed:
                keys.setdefault(config_key(fixed, self._ceilings), None)
            return
        prop = t.system_attrs.get(PROPOSAL_ATTR)
        prop = prop if isinstance(prop, dict) else {}
        for name, dist in t.distributions.items():
            old = f.space.get(name)
            if old is not None and not compatible(old, dist):
                f.conflicts.add(name)
            f.space[name] = dist
        proposed = dict(prop.get("params") or {})
        config = dict(proposed)
        if t.state.is_finished() and t.params:
            # what it ran: a proposed param it never suggested (a branch of a conditional space not
            # taken) is no part of it, or moves on that param would rerun this configuration
            config = {k: v for k, v in config.items() if k in t.params}
        for name, value in t.params.items():
            if self._movable(name, t.distributions[name]):
                config[name] = value
        value = None
        if t.state == TrialState.COMPLETE and t.values is not None and len(t.values) == 1:
            if math.isfinite(t.values[0]):
                value = float(t.values[0])
        diagnosis = t.user_attrs.get("diagnosis")
        rec = Rec(
            number=t.number,
            state=t.state,
            value=value,
            config=config,
            diagnosis=diagnosis if isinstance(diagnosis, str) else None,
            kind=str(prop.get("kind", "")),
            parent=prop.get("parent"),
            param=prop.get("param"),
            direction=int(prop.get("dir", 0) or 0),
            scale=float(prop.get("scale", 1.0) or 1.0),
            move=str(prop.get("move", "")),
            scope=str(prop.get("scope", "")),
        )
        recs[t.number] = rec
        f.n_trials += 1
        if rec.kind in ("lazy", "move") and rec.param:  # claim the move itself, too (as proposed: a wrapper
            # such as PartialFixedSampler may have run another value, and the move must still count as taken)
            moved = proposed.get(rec.param, config.get(rec.param))
            keys.setdefault(move_key(rec.parent, rec.param, rec.direction, rec.scale, moved), rec)
            f.moved.add(rec.param)
        if proposed and rec.kind in ("move", "explore") and t.state.is_finished():
            keys.setdefault(config_key(proposed, self._ceilings), rec)  # the proposal itself, whatever ran
        if (rec.kind == "move" and rec.param in proposed and rec.param in t.params
                and norm(t.params[rec.param]) != norm(proposed[rec.param])):
            f.conflicts.add(rec.param)
        if config and (rec.kind != "lazy" or t.state.is_finished()):  # a running lazy trial's params are partial
            key = config_key(config, self._ceilings)
            if keys.get(key) is None or not keys[key].state.is_finished():  # type: ignore[union-attr]
                keys[key] = rec
        if f.base is None and rec.kind != "explore" and (config or rec.kind == "baseline"):
            f.base = rec
        if rec.kind == "explore":
            f.last_explore = max(f.last_explore, t.number)
            f.explores_since += 1
        if t.state.is_finished():
            f.last_finished = rec
            inc = f.incumbent
            failed = value is None or inc is None or not self.better(value, inc.value, direction)  # type: ignore[arg-type]
            if rec.kind == "move" and rec.param and failed:
                kind = move_kind(rec.param, rec.direction, config.get(rec.param))
                f.fails[kind] = f.fails.get(kind, 0) + 1
            if value is not None and (f.incumbent is None or self.better(value, f.incumbent.value, direction)):  # type: ignore[arg-type]
                rec.improved = True
                rec.beaten = f.incumbent.value if f.incumbent is not None else None
                f.incumbent = rec
                f.explores_since = 0
