"""The study's trial total: how trials are counted, and the total stored on the study itself.

`status`, the progress bars and the workers' cap all read the total from here, so they agree
whatever the study file says later.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from cycle_optuna import optuna_internals as internals
from cycle_optuna import storage as storage_mod

N_TRIALS_ATTR = "cycle_optuna_n_trials"  # study user attr: the total the study was last run to


def stood_in_for(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials a retry stands in for (one names them in its retry_history): failures
    that were retried, and a trial whose hand-back was cut short after queuing its retry."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def count(trials: list[FrozenTrial]) -> int:
    """Trials toward the cap: all, except those a retry stands in for."""
    retried = stood_in_for(trials)
    return sum(1 for t in trials if t.number not in retried)


def count_and_waiting(study: optuna.Study, conn=None) -> tuple[int, bool]:
    """(trials toward the cap, whether a retry waits to run)."""
    # one lean query on a database (on the cap lock's connection when it has one); the full trial
    # list elsewhere (journal files)
    lean = storage_mod.count_trials(internals.storage_of(study), study, conn)
    if lean is not None:
        return lean
    trials = study.get_trials(deepcopy=False)
    return count(trials), any(t.state == TrialState.WAITING for t in trials)


def trials_counted(study: optuna.Study) -> int:
    """Trials toward the study's n_trials cap: all, except those a retry stands in for."""
    return count_and_waiting(study)[0]


def stored(study: optuna.Study) -> int | None:
    """The total stored on the study; None for a study no cycle-optuna worker has run."""
    value = study.user_attrs.get(N_TRIALS_ATTR)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def resolve(study: optuna.Study | None, *, flag: int | None, file: int) -> int:
    """The total to run to: --n-trials when given, else the larger of the study file's and the stored one."""
    if flag is not None:
        return flag
    held = stored(study) if study is not None else None
    return max(file, held) if held is not None else file


def shown(study: optuna.Study, file: int) -> int:
    """The total `status` shows: the stored one, else the study file's."""
    held = stored(study)
    return held if held is not None else file


def record(study: optuna.Study, total: int) -> None:
    """Store `total` on the study, unless the study already holds more trials than that."""
    if stored(study) != total and trials_counted(study) <= total:
        study.set_user_attr(N_TRIALS_ATTR, total)


def too_small(study: optuna.Study, total: int) -> str | None:
    """The one line to print when the study already holds more than `total` trials; None otherwise."""
    held = trials_counted(study)
    if held <= total:
        return None
    return (f"study {study.study_name!r} already holds {held} trials, more than the requested total of {total}; "
            f"pass --n-trials {held + 1} or more to grow it")
