"""ParentCurvePruner: judge a trial against the curve it should beat, at the same epoch."""

from __future__ import annotations

import math
import threading

from optuna.pruners import BasePruner
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from cycle_optuna.sampler._history import PROPOSAL_ATTR  # the CycleSampler's decision on each trial

__all__ = ["PROPOSAL_ATTR", "ParentCurvePruner"]


class ParentCurvePruner(BasePruner):
    """Prune a trial whose curve falls behind its reference curve at the same step.

    The reference is the trial this one was derived from (the CycleSampler's parent: the
    incumbent it moved away from), or, for trials without a parent, the best finished trial.
    At step s the trial's best value so far is compared with the reference's best value up to
    step s; the trial is pruned once it has been behind by more than the margin (relative) at
    ``patience`` reported steps in a row. The margin at step s is ``margin`` plus ``early_margin``
    scaled by the share of the steps still to come: wide early, when curves cross often (a slow
    start is not a bad configuration), and ``margin`` at the last step. Nothing is pruned during
    the first ``warmup_fraction`` of ``n_steps``, and the first trial of each kind of move (the moved parameter and direction,
    or an exploration) is not pruned during the first half of ``n_steps``: a kind of change is
    never written off on a quarter of its training.

    Args:
        n_steps: The step budget of one trial (epochs): warm-ups are fractions of it.
        warmup_fraction: Share of ``n_steps`` before any pruning, in [0, 1].
        margin: Relative distance behind the reference that counts (0.02 = 2% worse) at the last step.
        early_margin: Added to ``margin`` at step 0, shrinking linearly to nothing at the last step.
        patience: Reported steps in a row the trial must be behind, >= 1.
        n_startup_trials: Finished trials needed before anything is pruned.
    """

    def __init__(
        self,
        *,
        n_steps: int,
        warmup_fraction: float = 0.25,
        margin: float = 0.0,
        early_margin: float = 0.0,
        patience: int = 2,
        n_startup_trials: int = 1,
    ) -> None:
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be an integer >= 1, but got {n_steps=}.")
        if not (isinstance(warmup_fraction, (int, float)) and 0 <= warmup_fraction <= 1):
            raise ValueError(f"warmup_fraction must be in [0, 1], but got {warmup_fraction=}.")
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, but got {margin=}.")
        if not (isinstance(early_margin, (int, float)) and math.isfinite(early_margin) and early_margin >= 0):
            raise ValueError(f"early_margin must be a finite number >= 0, but got {early_margin=}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, but got {patience=}.")
        if isinstance(n_startup_trials, bool) or not isinstance(n_startup_trials, int) or n_startup_trials < 0:
            raise ValueError(f"n_startup_trials must be an integer >= 0, but got {n_startup_trials=}.")
        self._n_steps = n_steps
        self._warmup = math.ceil(warmup_fraction * n_steps)
        self._first_try = max(self._warmup, math.ceil(n_steps / 2))
        self._margin = float(margin)
        self._early_margin = float(early_margin)
        self._patience = patience
        self._n_startup = n_startup_trials
        self._reasons: dict[int, str] = {}  # trial number -> why it was pruned, until taken
        self._lock = threading.Lock()

    def pop_reason(self, number: int) -> str | None:
        """Why trial `number` was pruned, in words (once; None if this pruner did not prune it)."""
        with self._lock:
            return self._reasons.pop(number, None)

    def margin_at(self, step: int) -> float:
        """The relative gap behind the reference that counts at `step` (0-based)."""
        if self._n_steps == 1 or not self._early_margin:
            return self._margin
        remaining = min(1.0, max(0.0, (self._n_steps - 1 - step) / (self._n_steps - 1)))
        return self._margin + self._early_margin * remaining

    def prune(self, study: Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self._warmup:
            return False
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state == TrialState.COMPLETE]
        if len(finished) < self._n_startup:
            return False
        if _is_baseline(trial):
            # the cycles' reference: first of all it has nothing to be judged against; a retry of it
            # (its worker lost) runs once others have finished, and pruned it would leave the study
            # without a finished baseline
            return False
        kind = _move_kind(trial)
        if kind is not None and step < self._first_try:
            if not any(t.number < trial.number and _move_kind(t) == kind for t in trials):
                return False
        ref = self._reference(study, trial, trials, finished)
        if ref is None:
            return False
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        mine = _best_so_far(trial, sign)
        theirs = _best_so_far(ref, sign)
        steps = sorted(s for s in trial.intermediate_values if s <= step)[-self._patience :]
        if len(steps) < self._patience:
            return False
        for s in steps:
            a, b = mine.get(s), _at_or_before(theirs, s)
            if a is None or b is None or not a > b + self.margin_at(s) * abs(b):
                return False
        a, b = sign * mine[step], sign * _at_or_before(theirs, step)  # type: ignore[operator]
        whose = "its parent, cycle" if ref.number == _parent_of(trial) else "the best finished trial, cycle"
        why = (f"best value {a:.4g} by epoch {step + 1} was behind {whose} {ref.number + 1} ({b:.4g} by the same "
               f"epoch) at {self._patience} reported epoch{'s' if self._patience > 1 else ''} in a row")
        with self._lock:
            self._reasons[trial.number] = why
            while len(self._reasons) > 1000:  # reasons nobody took
                self._reasons.pop(next(iter(self._reasons)))
        return True

    @staticmethod
    def _reference(study: Study, trial: FrozenTrial, trials: list[FrozenTrial], finished: list[FrozenTrial]) -> FrozenTrial | None:
        """The parent the sampler derived this trial from, else the best finished trial."""
        by_number = {t.number: t for t in trials}
        parent = _parent_of(trial)
        ref = by_number.get(parent) if parent is not None else None
        if ref is not None and ref.intermediate_values:
            return ref
        scored = [t for t in finished if t.intermediate_values and t.value is not None and math.isfinite(t.value)]
        if not scored:
            return None
        best = min if study.direction != StudyDirection.MAXIMIZE else max
        return best(scored, key=lambda t: t.value)  # type: ignore[arg-type, return-value]


def _parent_of(trial: FrozenTrial) -> int | None:
    """The trial number the CycleSampler derived this trial from, if any."""
    prop = trial.system_attrs.get(PROPOSAL_ATTR)
    parent = prop.get("parent") if isinstance(prop, dict) else None
    return parent if isinstance(parent, int) and not isinstance(parent, bool) else None


def _is_baseline(trial: FrozenTrial) -> bool:
    """The CycleSampler's baseline trial, or a retry of it (a retry keeps the user attrs)."""
    prop = trial.system_attrs.get(PROPOSAL_ATTR)
    return (isinstance(prop, dict) and prop.get("kind") == "baseline") or trial.user_attrs.get("cycle_move") == "baseline"


def _move_kind(trial: FrozenTrial) -> str | None:
    """What kind of change a trial tried: `param:+1`, `explore`, or None (baseline, unknown)."""
    prop = trial.system_attrs.get(PROPOSAL_ATTR)
    if not isinstance(prop, dict):
        return None
    if prop.get("kind") == "explore":
        return "explore"
    if prop.get("kind") in ("move", "lazy") and prop.get("param"):
        return f"{prop['param']}:{prop.get('dir', 0)}"
    return None


def _best_so_far(trial: FrozenTrial, sign: float) -> dict[int, float]:
    """Step -> the best (sign-adjusted) value reported up to it; non-finite values skipped."""
    out: dict[int, float] = {}
    best = math.inf
    for s in sorted(trial.intermediate_values):
        v = trial.intermediate_values[s]
        if math.isfinite(v):
            best = min(best, sign * v)
        if math.isfinite(best):
            out[s] = best
    return out


def _at_or_before(curve: dict[int, float], step: int) -> float | None:
    """The reference's best up to `step`; a reference that stopped early keeps its last best."""
    keys = [s for s in curve if s <= step]
    return curve[max(keys)] if keys else None

