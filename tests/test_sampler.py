"""CycleSampler rules, one behaviour per test, driven through ask/tell with scripted results."""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import TrialState

from cycle_optuna.config import SamplerConfig
from cycle_optuna.sampler import CycleSampler, ReferenceScheduleSampler, Roles, make_sampler
from cycle_optuna.storage import retry_callback

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "lr": FloatDistribution(1e-4, 1e-2, log=True),
    "hidden_dim": CategoricalDistribution([32, 64, 128, 256]),
    "n_layers": IntDistribution(1, 6),
    "n_heads": CategoricalDistribution([2, 4, 8]),
    "batch_size": CategoricalDistribution([16, 32, 64, 128]),
    "dropout": FloatDistribution(0.0, 0.5),
}
BASELINE = {"lr": 5e-4, "hidden_dim": 64, "n_layers": 2, "n_heads": 4, "batch_size": 32, "dropout": 0.1}


class Stub(BaseSampler):
    """Fallback that answers a fixed value per parameter, so tests can see where a value came from."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, name, dist):
        return self.values[name]


def run(outcomes: list[Any], *, space=SPACE, direction="minimize", **kwargs: Any) -> optuna.Study:
    """One trial per outcome, then one more asked and left running.

    An outcome is a value, ``(value, diagnosis)``, ``"pruned"``, ``"diverged"`` or ``"fail"``.
    """
    kwargs.setdefault("baseline", BASELINE)
    kwargs.setdefault("seed", 0)
    study = optuna.create_study(direction=direction, sampler=CycleSampler(**kwargs))
    for outcome in outcomes:
        trial = study.ask(dict(space))
        diagnosis = None
        if isinstance(outcome, tuple):
            outcome, diagnosis = outcome
        if outcome == "diverged":
            trial.set_user_attr("diagnosis", "diverged")
            study.tell(trial, state=TrialState.PRUNED)
            continue
        if diagnosis:
            trial.set_user_attr("diagnosis", diagnosis)
        if outcome == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        elif outcome == "fail":
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, outcome)
    study.ask(dict(space))
    return study


def last(study: optuna.Study) -> optuna.trial.FrozenTrial:
    return study.get_trials(deepcopy=False)[-1]


def move(study: optuna.Study) -> tuple[Any, str]:
    t = last(study)
    return t.user_attrs["cycle_parent"], t.user_attrs["cycle_move"]


# -- the rules, as a table: history -> (parent, move) of the next trial ---------------------------
RULES = [
    ("cycle 1 is the baseline", [], (None, "baseline")),
    ("first move from the baseline: lr up", [1.0], (1, "lr x2")),
    ("improved: same move again", [1.0, 0.9], (2, "lr x2")),
    ("improved twice in a row: larger step", [1.0, 0.9, 0.8], (3, "lr x4")),
    ("worse: back to the incumbent, the opposite", [1.0, 1.1], (1, "lr /2")),
    ("opposite worse too: next move", [1.0, 1.1, 1.2], (1, "layers +1")),
    ("improvement inside the noise margin does not count: a tie, one step larger", [1.0, 0.9995], (1, "lr x4")),
    ("worse by more than a tie: the opposite", [1.0, 1.03], (1, "lr /2")),
    ("a tie at the larger step: larger again", [1.0, 1.01, 1.005], (1, "lr x8")),
    ("ties stop growing at the largest step", [1.0, 1.01, 1.005, 1.0], (1, "lr /2")),
    ("a pruned move is no tie", [1.0, "pruned"], (1, "lr /2")),
    ("a tie on an int steps no further", [(1.0, "underfit"), 1.01], (1, "layers -1")),
    ("pruned counts as worse", [1.0, "pruned"], (1, "lr /2")),
    ("failed (NaN) counts as worse", [1.0, "fail"], (1, "lr /2")),
    ("underfit: capacity up first", [(1.0, "underfit")], (1, "layers +1")),
    ("overfit: dropout up first", [(1.0, "overfit")], (1, "dropout +0.1")),
    ("converging slowly: lr up first", [(1.0, "converging")], (1, "lr x2")),
    ("unstable: lr down first", [(1.0, "unstable")], (1, "lr /2")),
    ("diverged: lr down before anything else", [(1.0, "underfit"), "diverged"], (1, "lr /2")),
    ("capacity up improved: keep growing first", [(1.0, "underfit"), 0.9], (2, "layers +1")),
    ("then one lr re-probe, the other way", [(1.0, "underfit"), 0.9, 0.95], (2, "lr /2")),
    ("then the default order", [(1.0, "underfit"), 0.9, 0.95, 0.95], (2, "lr x2")),
    ("below the baseline: like underfit", [(1.0, "below_baseline")], (1, "layers +1")),
    ("baseline diverged, no result yet: lr down from it", ["diverged"], (1, "lr /2")),
]


@pytest.mark.parametrize("outcomes,expected", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rule(outcomes, expected):
    assert move(run(outcomes)) == expected


def test_reason_names_parent_result_and_move():
    reason = last(run([0.931, 0.918])).user_attrs["cycle_reason"]
    assert reason == "cycle 3: cycle 2 improved 0.931 -> 0.918 with lr x2; trying lr x2 again"


@pytest.mark.parametrize(
    "outcomes,phrase",
    [
        ([1.0, 1.1], "cycle 2 (lr x2) was worse: 1.1 vs 1 (cycle 1); back to cycle 1, trying the opposite of cycle 2 (lr x2): lr /2"),
        ([1.0, "diverged"], "cycle 2 (lr x2) diverged"),
        ([(1.0, "underfit")], "cycle 1 looks underfit: trying layers +1"),
        ([(1.0, "underfit"), 0.9, 0.95], "re-probing lr after the capacity change: lr /2"),
        ([1.0, 0.9, 0.8, 0.7], "trying lr x1.25 (same way, up to the end of the range)"),
        ([1.0, 0.9, 0.8], "trying lr x4 (same way, larger step)"),
    ],
)
def test_reason_sentences(outcomes, phrase):
    assert phrase in last(run(outcomes)).user_attrs["cycle_reason"]


def test_a_repeat_after_another_cycle_finished_names_the_cycle_it_repeats():
    # two cycles run at once: cycle 2 (lr x2) improves, cycle 3 (another move from cycle 1) is
    # pruned after it; the next cycle repeats cycle 2's move, and must say it starts from cycle 2
    study = optuna.create_study(sampler=CycleSampler(baseline=BASELINE, seed=0))
    study.tell(study.ask(dict(SPACE)), 1.0)
    second, third = study.ask(dict(SPACE)), study.ask(dict(SPACE))
    assert second.user_attrs["cycle_move"] == "lr x2" and third.user_attrs["cycle_parent"] == 1
    study.tell(second, 0.9)
    study.tell(third, state=TrialState.PRUNED)
    t = study.ask(dict(SPACE))
    assert t.user_attrs["cycle_parent"] == 2 and t.params["lr"] == pytest.approx(2e-3)
    assert t.user_attrs["cycle_reason"] == (
        f"cycle 4: cycle 3 ({third.user_attrs['cycle_move']}) was pruned; back to cycle 2 (lr x2), trying lr x2 again"
    )


def test_a_retry_says_which_cycle_it_retries_under_its_own_number():
    # Optuna's retry callback copies the failed trial's attrs, its "cycle 2: ..." reason included
    study = optuna.create_study(sampler=CycleSampler(baseline=BASELINE, seed=0))
    study.tell(study.ask(dict(SPACE)), 1.0)
    failed = study.ask(dict(SPACE))
    original = failed.user_attrs["cycle_reason"]
    assert original.startswith("cycle 2: ")
    retry = retry_callback()  # the one workers use
    for number in (2, 3):  # the retry fails too: the retry of the retry names the first cycle once
        study.tell(failed, state=TrialState.FAIL)
        retry(study, study.trials[failed.number])
        failed = study.ask(dict(SPACE))
        assert failed.number == number and failed.params == study.trials[1].params
        assert failed.user_attrs["cycle_reason"] == f"cycle {number + 1}: retry of cycle 2; " + original.split(": ", 1)[1]
        assert failed.user_attrs["cycle_parent"] == 1
    assert study.trials[1].user_attrs["cycle_reason"] == original


def test_repeat_on_an_unevenly_spaced_list_says_again():
    # 161 -> 256 -> 406: the log steps differ, but a list always moves one choice
    space = {"width": CategoricalDistribution([101, 161, 256, 406, 645])}
    study = run([1.0, 0.9], space=space, baseline={"width": 161}, roles=Roles(hidden="width"))
    reason = last(study).user_attrs["cycle_reason"]
    assert last(study).params == {"width": 406}
    assert reason.endswith("trying hidden 256->406 again"), reason


def test_repeat_on_a_linear_float_compares_linear_steps():
    space = {"dropout": FloatDistribution(0.0, 0.5)}
    kwargs = dict(space=space, baseline={"dropout": 0.1})
    once = last(run([1.0, 0.9], **kwargs))  # +0.1 improved once: the same step again, not "up to the end"
    assert once.params == {"dropout": 0.3} and once.user_attrs["cycle_reason"].endswith("again")
    twice = last(run([1.0, 0.9, 0.8], **kwargs))  # two in a row: a step twice as large
    assert twice.params["dropout"] == pytest.approx(0.5)
    assert "(same way, larger step)" in twice.user_attrs["cycle_reason"]


def test_a_tie_with_the_incumbent_is_not_called_worse():
    reason = last(run([1.0, 1.0])).user_attrs["cycle_reason"]
    assert reason.startswith("cycle 3: cycle 2 (lr x2) matched cycle 1 (1) without beating it"), reason


def test_a_tie_takes_a_larger_step_and_says_why():
    study = run([1.0, 1.015])
    t = last(study)
    assert t.params["lr"] == pytest.approx(5e-4 * 4) and t.user_attrs["cycle_parent"] == 1
    assert t.user_attrs["cycle_reason"] == (
        "cycle 3: cycle 2 (lr x2) was worse: 1.015 vs 1 (cycle 1); cycle 2 ended within 2% of cycle 1, "
        "too close to tell; trying a larger step the same way: lr x4"
    )
    # Every other parameter stays at the parent's: one change per cycle.
    assert {k: v for k, v in t.params.items() if k != "lr"} == {k: v for k, v in BASELINE.items() if k != "lr"}


def test_baseline_trial_uses_baseline_params():
    study = run([1.0])
    assert study.trials[0].params == BASELINE


def test_proposal_differs_from_incumbent_in_one_parameter():
    study = run([1.0, 0.9, 1.2, 1.3])
    incumbent, proposed = study.trials[1].params, last(study).params
    assert sum(incumbent[k] != proposed[k] for k in incumbent) == 1


def test_plateau_gives_one_exploration_trial_around_the_incumbent():
    study = run([1.0, 1.1, 1.1, 1.1, 1.1], plateau_cycles=4)
    assert move(study) == (1, "explore (local)")
    reason = last(study).user_attrs["cycle_reason"]
    assert "no improvement in the 4 cycles after cycle 1 (the incumbent)" in reason
    changed = [k for k in BASELINE if last(study).params[k] != BASELINE[k]]
    assert len(changed) >= 2 and "2 changes at once" in reason


def test_global_exploration_only_after_local_ones_failed():
    outcomes = [1.0] + [1.1] * 4 + [1.2] + [1.1] * 4 + [1.2] + [1.1] * 4
    study = run(outcomes, plateau_cycles=4)
    moves = [t.user_attrs["cycle_move"] for t in study.trials]
    assert [m for m in moves if m.startswith("explore")] == ["explore (local)", "explore (local)", "explore (tpe)"]
    assert "2 explorations after cycle 1 found nothing better" in last(study).user_attrs["cycle_reason"]


def test_after_exploration_local_search_resumes():
    study = run([1.0, 1.1, 1.1, 1.1, 1.1, 1.2], plateau_cycles=4)
    assert move(study)[0] == 1


def test_exploration_that_wins_moves_the_local_search():
    study = run([1.0, 1.1, 1.1, 1.1, 1.1, 0.5], plateau_cycles=4)
    assert move(study)[0] == 6
    assert "exploration cycle 6 improved 1 -> 0.5" in last(study).user_attrs["cycle_reason"]


def test_step_shrinks_when_every_move_failed():
    space = {"lr": SPACE["lr"]}
    study = run([1.0, 1.1, 1.1], space=space, baseline={"lr": 1e-3}, plateau_cycles=100)
    assert move(study) == (1, "lr x1.41")


def test_every_move_at_smallest_step_tried_explores():
    space = {"lr": SPACE["lr"]}
    study = run([1.0] + [1.1] * 6, space=space, baseline={"lr": 1e-3}, plateau_cycles=100)
    assert move(study) == (1, "explore (tpe)")  # one parameter: no local exploration to make
    assert "smallest step" in last(study).user_attrs["cycle_reason"]


def test_hidden_move_keeps_heads_dividing_hidden():
    space = {"hidden_dim": CategoricalDistribution([12, 16, 32]), "n_heads": CategoricalDistribution([3, 4, 8])}
    study = run([1.0, 1.1], space=space, baseline={"hidden_dim": 16, "n_heads": 8})
    params = last(study).params
    assert move(study) == (1, "hidden 16->12, heads 8->4")
    assert params["hidden_dim"] % params["n_heads"] == 0


def test_heads_move_skips_choices_that_do_not_divide_hidden():
    space = {"n_heads": CategoricalDistribution([2, 3, 4]), "hidden_dim": CategoricalDistribution([8])}
    study = run([1.0], space=space, baseline={"n_heads": 2, "hidden_dim": 8})
    assert move(study) == (1, "heads 2->4")


def test_maximize_treats_larger_as_better():
    assert move(run([1.0, 1.1], direction="maximize")) == (2, "lr x2")
    assert move(run([1.0, 0.9], direction="maximize")) == (1, "lr /2")


def test_batch_and_dropout_step_to_neighbours():
    study = run([1.0] + [1.1] * 5, plateau_cycles=100)  # lr x2, lr /2, layers +-1, hidden up tried
    assert move(study) == (1, "hidden 64->32")
    study = run([1.0] + [1.1] * 7, plateau_cycles=100)
    assert move(study) == (1, "dropout -0.1")
    study = run([1.0] + [1.1] * 8, plateau_cycles=100)
    assert move(study) == (1, "batch 32->64")


# -- generic parameters of a user's study ------------------------------------------------------------
@pytest.mark.parametrize(
    "dist,start,expected",
    [
        (FloatDistribution(-1.0, 1.0), 0.0, 0.4),
        (FloatDistribution(1e-6, 1.0, log=True), 1e-3, 2e-3),
        (FloatDistribution(-10, 10, step=0.5), 0.0, 4.0),
        (IntDistribution(0, 10), 5, 6),
        (IntDistribution(1, 100, log=True), 10, 20),
        (IntDistribution(0, 10, step=2), 4, 6),
        (CategoricalDistribution([1, 10, 100]), 10, 100),
        (CategoricalDistribution([0.5, 0.1, 0.9]), 0.5, 0.9),
    ],
)
def test_generic_numeric_parameter_steps_up_first(dist, start, expected):
    study = run([1.0], space={"x": dist}, baseline={"x": start})
    assert last(study).params["x"] == pytest.approx(expected)
    assert move(study)[0] == 1


def test_unordered_categorical_moves_on_its_own_and_is_inherited_otherwise():
    space = {"x": FloatDistribution(0, 1), "opt": CategoricalDistribution(["adam", "sgd"])}
    study = run([1.0, 0.9], space=space, baseline={"x": 0.5, "opt": "adam"}, fallback=Stub({"opt": "adam", "x": 0.1}))
    assert [t.params["opt"] for t in study.trials] == ["adam", "sgd", "sgd"]
    assert [t.params["x"] for t in study.trials] == [0.5, 0.5, 0.7]
    assert [t.user_attrs["cycle_move"] for t in study.trials[1:]] == ["opt adam->sgd", "x +0.2"]


def test_roles_are_configurable():
    space = {"eta": FloatDistribution(1e-4, 1e-1, log=True), "depth": IntDistribution(1, 8)}
    roles = Roles(lr="eta", layers="depth", hidden=None, heads=None, dropout=None, batch=None)
    study = run([(1.0, "underfit")], space=space, baseline={"eta": 1e-3, "depth": 2}, roles=roles)
    assert move(study) == (1, "layers +1")


def test_generic_moves_off_leaves_other_params_to_fallback():
    space = {"lr": SPACE["lr"], "x": FloatDistribution(0, 1)}
    study = run([1.0, 1.1, 1.1], space=space, baseline={"lr": 1e-3, "x": 0.5}, generic_moves=False,
                fallback=Stub({"x": 0.25}), plateau_cycles=100)
    assert [t.params["x"] for t in study.trials] == [0.5, 0.25, 0.25, 0.25]
    assert move(study) == (1, "lr x1.41")


def test_baseline_missing_a_parameter_takes_it_from_fallback():
    baseline = {k: v for k, v in BASELINE.items() if k != "dropout"}
    study = run([], baseline=baseline, fallback=Stub({"dropout": 0.3}))
    assert study.trials[0].params["dropout"] == 0.3


def test_without_baseline_first_trial_comes_from_fallback():
    study = run([], space={"x": FloatDistribution(0, 1)}, baseline=None, fallback=Stub({"x": 0.25}))
    assert study.trials[0].params == {"x": 0.25}
    assert move(study) == (None, "first trial (Stub)")


def test_conditional_parameters():
    sampler = CycleSampler(baseline={"kind": "a", "x": 0.5, "y": 3}, seed=0)
    study = optuna.create_study(sampler=sampler)

    def objective(trial):
        if trial.suggest_categorical("kind", ["a", "b"]) == "a":
            return trial.suggest_float("x", 0, 1)
        return trial.suggest_int("y", 0, 10) / 10

    study.optimize(objective, n_trials=15)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert all("cycle_reason" in t.user_attrs for t in study.trials)


def test_single_value_distributions_are_left_alone():
    space = {"x": FloatDistribution(0, 1), "one": IntDistribution(3, 3), "c": CategoricalDistribution([7])}
    study = run([1.0, 0.9], space=space, baseline={"x": 0.5})
    assert all(t.params["one"] == 3 and t.params["c"] == 7 for t in study.trials)


def test_nan_objective_is_failed_and_skipped():
    sampler = CycleSampler(baseline={"x": 0.5}, seed=0)
    study = optuna.create_study(sampler=sampler)
    values = iter([1.0, math.nan, 0.5, 0.4])
    study.optimize(lambda t: t.suggest_float("x", 0, 1) * 0 + next(values), n_trials=4)
    assert [t.state for t in study.trials].count(TrialState.FAIL) == 1
    assert study.best_value == 0.4


def test_enqueued_trial_keeps_fixed_params_and_incumbent_for_the_rest():
    study = optuna.create_study(sampler=CycleSampler(baseline=BASELINE, seed=0))
    study.tell(study.ask(dict(SPACE)), 1.0)
    study.enqueue_trial({"lr": 3e-3})
    trial = study.ask(dict(SPACE))
    assert trial.params == {**BASELINE, "lr": 3e-3}
    assert trial.user_attrs["cycle_move"] == "enqueued"


def test_no_duplicates_while_trials_are_running():
    study = optuna.create_study(sampler=CycleSampler(baseline=BASELINE, seed=0, plateau_cycles=100))
    study.tell(study.ask(dict(SPACE)), 1.0)
    running = [study.ask(dict(SPACE)) for _ in range(12)]
    configs = [tuple(sorted(t.params.items())) for t in running]
    assert len(set(configs)) == len(configs)
    assert all(t.user_attrs["cycle_parent"] == 1 for t in running)


def test_workers_starting_together_get_baseline_and_its_neighbours():
    study = optuna.create_study(sampler=CycleSampler(baseline=BASELINE, seed=0))
    trials = [study.ask() for _ in range(3)]  # nothing suggested yet: the space is unknown
    params = [{name: t._suggest(name, dist) for name, dist in SPACE.items()} for t in trials]
    assert params[0] == BASELINE
    assert params[1] == {**BASELINE, "lr": 1e-3}
    assert params[2] == {**BASELINE, "lr": 2.5e-4}


def test_deterministic_for_a_seed_and_history():
    def sequence():
        sampler = CycleSampler(baseline={"x": 0.1, "y": 2}, seed=3, plateau_cycles=2)
        study = optuna.create_study(sampler=sampler)
        study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.3) ** 2 + t.suggest_int("y", 0, 5), n_trials=20)
        return [t.params for t in study.trials]

    assert sequence() == sequence()


def test_resumed_study_proposes_what_an_uninterrupted_one_would():
    def objective(t):
        return (t.suggest_float("x", -1, 1) - 0.3) ** 2 + t.suggest_int("y", 0, 5)

    def make():
        return CycleSampler(baseline={"x": 0.1, "y": 2}, seed=3, plateau_cycles=2)

    whole = optuna.create_study(sampler=make())
    whole.optimize(objective, n_trials=16)
    resumed = optuna.create_study(sampler=make())
    resumed.optimize(objective, n_trials=9)
    resumed.sampler = make()  # a new process: empty caches, fresh fallback
    resumed.optimize(objective, n_trials=7)
    assert any(t.user_attrs["cycle_move"].startswith("explore") for t in resumed.trials[9:])
    assert [t.params for t in resumed.trials] == [t.params for t in whole.trials]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr_factor": 1.0}, "lr_factor=1.0"),
        ({"noise_margin": -0.1}, "noise_margin=-0.1"),
        ({"plateau_cycles": 0}, "plateau_cycles=0"),
        ({"baseline": [1, 2]}, "baseline=\\[1, 2\\]"),
        ({"fallback": 3}, "fallback=3"),
        ({"roles": {"lr": "eta"}}, "roles="),
    ],
)
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CycleSampler(**kwargs)


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        CycleSampler(BASELINE)  # type: ignore[misc]


def test_roles_must_be_distinct():
    with pytest.raises(ValueError, match="one role"):
        Roles(lr="x", layers="x")


def test_multi_objective_is_refused():
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=CycleSampler(seed=0))
    with pytest.raises(ValueError, match="multi-objective"):
        study.ask()
    with pytest.raises(ValueError, match="multi-objective"):
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), 0.0), n_trials=1)
    # the trials Optuna created before the refusal are ended, not left RUNNING for ever
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]


def test_reseed_rng_reseeds_fallback():
    CycleSampler(seed=0).reseed_rng()


# -- factory and reference schedule --------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,cls",
    [
        ("cycle", CycleSampler),
        ("reference", ReferenceScheduleSampler),
        ("tpe", optuna.samplers.TPESampler),
        ("random", optuna.samplers.RandomSampler),
        ("cmaes", optuna.samplers.CmaEsSampler),
    ],
)
def test_make_sampler_covers_every_type(kind, cls):
    assert isinstance(make_sampler(SamplerConfig(type=kind), baseline=BASELINE, seed=0), cls)


def test_make_sampler_passes_cycle_settings():
    cfg = SamplerConfig(type="cycle", lr_factor=3.0, plateau_cycles=2, fallback="random")
    study = optuna.create_study(sampler=make_sampler(cfg, baseline=BASELINE, seed=0))
    for value in (1.0, 0.9):
        study.tell(study.ask(dict(SPACE)), value)
    assert study.ask(dict(SPACE)).user_attrs["cycle_move"] == "lr x3"


def test_study_file_tpe_fallback_models_the_space_jointly():
    """A study file's `fallback = "tpe"` is multivariate, like CycleSampler's own default: an
    exploration sees every parameter together (independent TPE would sample each alone)."""
    sampler = make_sampler(SamplerConfig(type="cycle", fallback="tpe", n_startup_trials=2), baseline=BASELINE, seed=0)
    fallback = sampler._make_fallback(7)  # built per trial from a derived seed
    assert isinstance(fallback, optuna.samplers.TPESampler) and fallback._multivariate
    assert fallback._n_startup_trials == 2


def test_reference_schedule_doubles_lr_and_grows_capacity_without_backing_off():
    sampler = make_sampler(SamplerConfig(type="reference"), baseline=BASELINE, seed=0)
    study = optuna.create_study(sampler=sampler)
    for value in (0.9192, 0.9206, 0.9213, 0.9213, 0.9218, 0.93):  # worse every cycle: no backing off
        study.tell(study.ask(dict(SPACE)), value)
    got = [(t.params["lr"], t.params["n_layers"], t.params["hidden_dim"]) for t in study.trials]
    assert got == [
        (5e-4, 2, 64), (1e-3, 3, 64), (2e-3, 4, 64), (4e-3, 5, 64), (8e-3, 6, 64), (1e-2, 6, 128),
    ]
    assert study.trials[3].user_attrs["cycle_parent"] == 3  # cycle 3, numbered like every "cycle N"
    assert "doubled lr and grew capacity" in study.trials[3].user_attrs["cycle_reason"]


def test_parallel_tpe_workers_do_not_ask_for_the_running_trials_configuration():
    """A study file's TPE (and the cycle sampler's fallback) lies about running trials, so two
    workers asking at once get different configurations; alone it samples as plain TPE does."""
    import warnings

    cfg = SamplerConfig(type="tpe", n_startup_trials=2)
    assert make_sampler(cfg, baseline=BASELINE, seed=0)._constant_liar
    assert make_sampler(SamplerConfig(type="cycle"), baseline=BASELINE, seed=0)._make_fallback(1)._constant_liar

    def objective(t):
        return (t.suggest_float("x", -3, 3) - 1) ** 2 + t.suggest_int("n", 1, 5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = optuna.create_study(sampler=optuna.samplers.TPESampler(n_startup_trials=2, seed=0))
        plain.optimize(objective, n_trials=12)
        ours = optuna.create_study(sampler=make_sampler(cfg, baseline=BASELINE, seed=0))
        ours.optimize(objective, n_trials=12)
    assert [t.params for t in ours.trials] == [t.params for t in plain.trials]


def test_one_sampler_on_study_after_study_decides_each_from_its_own_trials():
    """Its caches are keyed on id(storage): a new in-memory storage that took a collected one's id
    was read as the old study (proposals and reasons from another study's values)."""
    import gc

    sampler = CycleSampler(seed=0)
    dist = {"x": FloatDistribution(0, 10)}
    for k in range(8):
        study = optuna.create_study(sampler=sampler)
        xs = (1.0, 2.5) if k % 2 == 0 else (9.0, 8.5)
        for v in xs:
            study.add_trial(optuna.trial.create_trial(params={"x": v}, distributions=dist, value=(v - 3) ** 2))
        study.optimize(lambda t: (t.suggest_float("x", 0, 10) - 3) ** 2, n_trials=1)
        reason = study.trials[-1].user_attrs["cycle_reason"]
        assert f"improved {_fmt((xs[0] - 3) ** 2)} -> {_fmt((xs[1] - 3) ** 2)}" in reason, (k, reason)
        del study
        gc.collect()


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def test_a_down_move_from_a_value_below_the_range_is_not_proposed_as_one():
    """Optuna runs an enqueued value outside the range; clipping it made "x down" land above it,
    described as the opposite of the up move it repeated."""
    study = optuna.create_study(sampler=CycleSampler(baseline={"x": 5.0}, seed=0))
    study.enqueue_trial({"x": 5.0})
    study.enqueue_trial({"x": -5.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's own warning about the fixed value
        study.optimize(lambda t: abs(t.suggest_float("x", 0, 10) + 5), n_trials=4)
    for t in study.trials[2:]:
        assert "opposite" not in t.user_attrs["cycle_reason"], t.user_attrs["cycle_reason"]
        assert t.user_attrs["cycle_move"].startswith("x +"), t.user_attrs["cycle_move"]


def test_every_opposite_a_reason_names_is_that_cycles_move_from_the_same_parent():
    """"trying the opposite of cycle 4 (x +2)" was written when cycle 4 was x +1 from another
    cycle, or the baseline: the trial holding the opposite configuration is not always a move."""
    import re

    study = optuna.create_study(sampler=CycleSampler(baseline={"x": 5.0, "y": 3}, seed=0))
    study.optimize(lambda t: abs(t.suggest_float("x", 0, 10) - 4.2) + abs(t.suggest_int("y", 0, 8) - 5) / 3,
                   n_trials=30)
    named = 0
    for t in study.trials:
        m = re.search(r"trying the opposite of cycle (\d+) \(([^)]*)\)", t.user_attrs["cycle_reason"])
        if m:
            other = study.trials[int(m.group(1)) - 1]
            assert other.user_attrs["cycle_move"] == m.group(2), (t.number, t.user_attrs["cycle_reason"])
            assert other.user_attrs["cycle_parent"] == t.user_attrs["cycle_parent"], t.user_attrs["cycle_reason"]
            named += 1
    assert named  # the claim is made, and true each time


def test_an_int_repeat_is_never_called_a_larger_step():
    """11 -> 6 -> 3 on a log int is ÷2 twice, rounded: "again", not "(same way, larger step)"."""
    import math as m

    study = optuna.create_study(sampler=CycleSampler(baseline={"b": 11}, seed=0))
    study.optimize(lambda t: abs(m.log2(t.suggest_int("b", 1, 1024, log=True)) - 1), n_trials=6)
    reasons = [t.user_attrs["cycle_reason"] for t in study.trials]
    assert any(" again" in r for r in reasons), reasons
    assert not any("larger step" in r for r in reasons), reasons


def test_a_move_claimed_before_the_baseline_finished_is_repeated_when_it_improves():
    """Workers asking while the baseline still runs get its neighbours ("lazy" moves); one that
    improves is kept going like any move."""
    study = optuna.create_study(sampler=CycleSampler(baseline={"x": 5.0}, seed=0))
    dist = {"x": FloatDistribution(0, 10)}
    first, second = study.ask(), study.ask()  # the second is claimed before the first has suggested x
    assert study.trials[1].system_attrs["cycle:proposal"]["kind"] == "lazy"
    for t in (second, first):
        t.suggest_float("x", 0, 10)
        study.tell(t, abs(t.params["x"] - 9))
    assert second.params["x"] > first.params["x"]  # x up came first, and is the better one
    third = study.ask(dist)
    assert third.params["x"] > second.params["x"]
    reason = study.trials[2].user_attrs["cycle_reason"]
    assert f"cycle 2 improved" in reason and " again" in reason, reason
