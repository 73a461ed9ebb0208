"""ParentCurvePruner on hand-built learning curves, through ask/tell."""

from __future__ import annotations

import optuna
import pytest

from cycle_optuna.config import PrunerConfig
from cycle_optuna.objective import make_pruner
from cycle_optuna.pruners import PROPOSAL_ATTR, ParentCurvePruner

optuna.logging.set_verbosity(optuna.logging.WARNING)

PARENT = [1.0, 0.8, 0.7, 0.6, 0.55, 0.5, 0.48, 0.46, 0.45, 0.44]


def finished(study: optuna.Study, curve: list[float], proposal: dict | None = None) -> optuna.trial.FrozenTrial:
    trial = study.ask()
    if proposal is not None:
        study._storage.set_trial_system_attr(trial._trial_id, PROPOSAL_ATTR, proposal)
    for step, v in enumerate(curve):
        trial.report(v, step)
    study.tell(trial, min(curve))
    return study.trials[-1]


def first_pruned_step(study: optuna.Study, curve: list[float], proposal: dict | None = None) -> int | None:
    """Report `curve` step by step; the step at which the pruner says stop, or None."""
    trial = study.ask()
    if proposal is not None:
        study._storage.set_trial_system_attr(trial._trial_id, PROPOSAL_ATTR, proposal)
    for step, v in enumerate(curve):
        trial.report(v, step)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return step
    study.tell(trial, min(curve))
    return None


def move(parent: int, param: str = "lr", d: int = 1) -> dict:
    return {"kind": "move", "parent": parent, "param": param, "dir": d}


def new_study(direction: str = "minimize", **kwargs) -> optuna.Study:
    kwargs = {"n_steps": 10, "warmup_fraction": 0.3, "patience": 2, **kwargs}
    return optuna.create_study(direction=direction, pruner=ParentCurvePruner(**kwargs))


def test_move_behind_its_parent_is_pruned_after_patience_steps_past_warmup():
    study = new_study()
    finished(study, PARENT)
    finished(study, [1.2] * 10, move(0, "layers"))  # the first lr move ran in full earlier
    behind = [v * 1.2 for v in PARENT]
    finished(study, behind, move(0, "lr"))  # the first lr move ran in full earlier
    # warm-up: steps 0-2 (0.3 x 10); behind at steps 2 and 3 in a row -> pruned at step 3
    assert first_pruned_step(study, behind, move(0, "lr")) == 3


def test_move_ahead_of_its_parent_is_never_pruned():
    study = new_study()
    finished(study, PARENT)
    finished(study, [2.0] * 10, move(0, "lr"))
    assert first_pruned_step(study, [v * 0.95 for v in PARENT], move(0, "lr")) is None


def test_slow_start_that_catches_up_survives_when_it_is_behind_only_once():
    study = new_study(patience=2)
    finished(study, PARENT)
    finished(study, [2.0] * 10, move(0, "lr"))
    slow = [1.3, 1.0, 0.75, 0.58, 0.52, 0.45, 0.4, 0.38, 0.37, 0.36]  # behind up to step 2, ahead from 3
    assert first_pruned_step(study, slow, move(0, "lr")) is None


def test_first_try_of_a_move_kind_is_not_pruned_before_half_of_the_steps():
    study = new_study()
    finished(study, PARENT)
    behind = [v * 1.5 for v in PARENT]
    assert first_pruned_step(study, behind, move(0, "dropout")) == 5  # steps 0-4 are the first half
    assert first_pruned_step(study, behind, move(0, "dropout")) == 3  # the second try: warm-up only
    assert first_pruned_step(study, behind, move(0, "dropout", -1)) == 5  # another direction is another kind


def test_compared_with_its_parent_not_with_the_best():
    study = new_study()
    finished(study, PARENT)
    weak_parent = finished(study, [v * 1.3 for v in PARENT], move(0, "lr"))
    # worse than the best trial everywhere, but ahead of the parent it was derived from
    curve = [v * 1.2 for v in PARENT]
    assert first_pruned_step(study, curve, move(weak_parent.number, "lr")) is None


def test_without_a_parent_the_best_finished_trial_is_the_reference():
    study = new_study()
    finished(study, [v * 1.1 for v in PARENT])
    finished(study, PARENT)
    assert first_pruned_step(study, [v * 1.05 for v in PARENT]) == 3  # behind the best, ahead of the other
    assert first_pruned_step(study, [v * 0.99 for v in PARENT]) is None


def test_the_baseline_and_a_retry_of_it_are_never_pruned():
    # a retry of cycle 1 (its worker lost) runs once moves have finished; pruned behind the best of
    # them, the study had no finished baseline. A retry keeps the user attrs, not the proposal
    study = new_study()
    finished(study, PARENT)
    behind = [v * 1.3 for v in PARENT]
    assert first_pruned_step(study, behind) == 3  # any other trial without a parent is
    assert first_pruned_step(study, behind, {"kind": "baseline", "parent": None, "move": "baseline"}) is None
    retry = study.ask()
    retry.set_user_attr("cycle_move", "baseline")
    steps = []
    for step, v in enumerate(behind):
        retry.report(v, step)
        steps.append(retry.should_prune())
    assert not any(steps)


def test_margin_tolerates_small_gaps():
    study = new_study(margin=0.1)
    finished(study, PARENT)
    assert first_pruned_step(study, [v * 1.05 for v in PARENT]) is None
    assert first_pruned_step(study, [v * 1.2 for v in PARENT]) == 3


def test_early_margin_spares_a_slow_start_and_shrinks_to_margin():
    # margin at step s: 0.1 + 0.3 * (9 - s) / 9 -> 0.3 at step 3, 0.233 at 5, 0.2 at 6, 0.1 at the last
    study = new_study(margin=0.1, early_margin=0.3)
    assert study.pruner.margin_at(0) == pytest.approx(0.4)
    assert study.pruner.margin_at(9) == pytest.approx(0.1)
    finished(study, PARENT)
    behind = [v * 1.25 for v in PARENT]  # 25% behind all along: pruned once the margin is below 25%
    assert first_pruned_step(study, behind) == 6  # behind by more than the margin at steps 5 and 6
    late_bloomer = [v * 1.25 for v in PARENT[:5]] + PARENT[5:]  # 25% behind up to step 4, then level
    assert first_pruned_step(study, late_bloomer) is None
    flat = new_study(margin=0.1)  # without the early margin both are stopped at the end of the warm-up
    finished(flat, PARENT)
    assert first_pruned_step(flat, behind) == 3
    assert first_pruned_step(flat, late_bloomer) == 3


def test_parent_that_stopped_early_keeps_its_last_best():
    study = new_study()
    finished(study, PARENT[:4])  # early-stopped at step 3 with 0.6
    # behind its 0.6 at steps 3 and 4: at step 4 the parent has no value of its own any more
    assert first_pruned_step(study, [0.95, 0.78, 0.69, 0.65, 0.62, 0.61, 0.61, 0.61, 0.61, 0.61]) == 4
    assert first_pruned_step(study, [0.95, 0.78, 0.69, 0.59, 0.58, 0.57, 0.5, 0.5, 0.5, 0.5]) is None


def test_maximize_compares_the_other_way():
    study = new_study(direction="maximize")
    up = [0.1 * (i + 1) for i in range(10)]
    finished(study, up)
    assert first_pruned_step(study, [v * 0.8 for v in up]) == 3
    assert first_pruned_step(study, [v * 1.1 for v in up]) is None


def test_warmup_scales_with_the_step_budget():
    behind = [v * 1.5 for v in PARENT] * 4
    long = new_study(n_steps=40, warmup_fraction=0.25)
    finished(long, PARENT * 4)
    assert first_pruned_step(long, behind) == 10  # steps 0-9 are the warm-up
    short = new_study(n_steps=8, warmup_fraction=0.25)
    finished(short, PARENT[:8])
    assert first_pruned_step(short, behind[:8]) == 2  # steps 0-1


def test_nothing_is_pruned_before_n_startup_trials_finished():
    study = new_study(n_startup_trials=2)
    finished(study, PARENT)
    assert first_pruned_step(study, [v * 2 for v in PARENT]) is None
    assert first_pruned_step(study, [v * 2 for v in PARENT]) == 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_steps": 0}, "n_steps"),
        ({"warmup_fraction": 1.5}, "warmup_fraction"),
        ({"margin": -0.1}, "margin"),
        ({"early_margin": float("nan")}, "early_margin"),
        ({"patience": 0}, "patience"),
        ({"n_startup_trials": -1}, "n_startup_trials"),
    ],
)
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParentCurvePruner(**{"n_steps": 10, **kwargs})


def test_make_pruner_builds_it_from_the_study_file_section():
    cfg = PrunerConfig(type="parent", warmup_fraction=0.5, patience=3, margin=0.01, early_margin=0.11, n_startup_trials=1)
    pruner = make_pruner(cfg, 12)
    assert isinstance(pruner, ParentCurvePruner)
    assert pruner.margin_at(0) == pytest.approx(0.12) and pruner.margin_at(11) == pytest.approx(0.01)
    study = optuna.create_study(pruner=pruner)
    finished(study, [1.0] * 12)
    behind = [2.0] * 12
    assert first_pruned_step(study, behind) == 6  # warm-up: steps 0-5, the first 6 of 12 epochs


def test_a_pruned_trial_gets_the_reason_in_numbers():
    study = new_study()
    finished(study, PARENT)
    finished(study, [1.2] * 10, move(0, "layers"))
    behind = [v * 1.2 for v in PARENT]
    finished(study, behind, move(0, "lr"))
    assert first_pruned_step(study, behind, move(0, "lr")) == 3
    why = study.pruner.pop_reason(3)
    assert why == ("best value 0.72 by epoch 4 was behind its parent, cycle 1 (0.6 by the same epoch) "
                   "at 2 reported epochs in a row")
    assert study.pruner.pop_reason(3) is None  # taken once



@pytest.mark.parametrize("kind", ["median", "percentile"])
@pytest.mark.parametrize("epochs, written, first", [(20, "auto", 2), (23, "auto", 2), (40, "auto", 5), (100, "auto", 12),
                                                    (100, 2, 2), (6, 0, 0)])
def test_the_optuna_pruners_warm_up_scales_with_the_epochs_unless_written(kind, epochs, written, first):
    """`n_warmup_steps = "auto"` (the default): an eighth of the epochs, at least 2. A fixed 2 judged
    a 100-epoch cycle on its first 3 epochs; 20 epochs (the default) keep 2, as before."""
    cfg = PrunerConfig(type=kind, n_startup_trials=1, n_warmup_steps=written)
    study = optuna.create_study(pruner=make_pruner(cfg, epochs))
    finished(study, [1.0] * epochs)
    step = first_pruned_step(study, [2.0] * epochs)
    assert step == first
