"""CycleSampler on mixed spaces: one change per cycle, categorical moves, duplicates, true reasons."""

from __future__ import annotations

import datetime
import math
import multiprocessing as mp
import re
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from cycle_optuna.sampler import CycleSampler

optuna.logging.set_verbosity(optuna.logging.WARNING)

MIXED = {
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
    "dropout": FloatDistribution(0.0, 0.5),
    "n_layers": IntDistribution(1, 6),
    "hidden_dim": CategoricalDistribution([16, 32, 64, 128]),
    "patch_len": CategoricalDistribution([1, 2, 4, 8]),
    "pooling": CategoricalDistribution(["mean", "cls", "last"]),
    "pos_encoding": CategoricalDistribution(["sinusoidal", "learned", "none"]),
    "instance_norm": CategoricalDistribution([False, True]),
}
MIXED_BASE = {
    "lr": 1e-3, "dropout": 0.1, "n_layers": 2, "hidden_dim": 32, "patch_len": 2,
    "pooling": "mean", "pos_encoding": "sinusoidal", "instance_norm": False,
}

# the space without its switch, whose first flip comes before every other move
STEPS = {k: v for k, v in MIXED.items() if k != "instance_norm"}
STEPS_BASE = {k: v for k, v in MIXED_BASE.items() if k != "instance_norm"}


def mixed_loss(p: dict[str, Any]) -> float:
    """Smooth in the numbers, with a best choice for each string and the bool."""
    return (
        (math.log10(p["lr"]) + 2.2) ** 2 + (p["dropout"] - 0.2) ** 2 + 0.05 * (p["n_layers"] - 4) ** 2
        + 0.02 * (math.log2(p["hidden_dim"]) - 6) ** 2 + 0.03 * (math.log2(p["patch_len"]) - 2) ** 2
        + {"mean": 0.1, "cls": 0.0, "last": 0.2}[p["pooling"]]
        + {"sinusoidal": 0.05, "learned": 0.0, "none": 0.3}[p["pos_encoding"]]
        + (0.0 if p["instance_norm"] else 0.08)
    )


def run_mixed(n: int, **kwargs: Any) -> optuna.Study:
    kwargs.setdefault("seed", 0)
    study = optuna.create_study(sampler=CycleSampler(baseline=MIXED_BASE, **kwargs))
    for _ in range(n):
        trial = study.ask(dict(MIXED))
        study.tell(trial, mixed_loss(trial.params))
    return study


def parent_of(trials: list[FrozenTrial], t: FrozenTrial) -> FrozenTrial | None:
    cycle = t.user_attrs.get("cycle_parent")
    return trials[cycle - 1] if isinstance(cycle, int) else None


def test_every_move_changes_exactly_one_parameter_of_any_kind():
    study = run_mixed(60, plateau_cycles=6)
    trials = study.trials
    moved: set[str] = set()
    for t in trials[1:]:
        move = t.user_attrs["cycle_move"]
        if move.startswith("explore"):
            continue
        parent = parent_of(trials, t)
        assert parent is not None, move
        diff = [k for k in MIXED if t.params[k] != parent.params[k]]
        assert len(diff) == 1, f"cycle {t.number + 1} ({move}) changed {diff} against cycle {parent.number + 1}"
        moved.add(diff[0])
    assert {"pooling", "pos_encoding", "instance_norm", "hidden_dim", "patch_len", "lr", "n_layers"} <= moved
    assert study.best_value < mixed_loss(MIXED_BASE) - 0.3


def test_categorical_moves_try_each_untried_choice_in_turn():
    space = {"pooling": MIXED["pooling"], "pos_encoding": MIXED["pos_encoding"]}
    base = {"pooling": "mean", "pos_encoding": "sinusoidal"}
    study = optuna.create_study(sampler=CycleSampler(baseline=base, seed=0, plateau_cycles=100))
    for _ in range(5):
        trial = study.ask(dict(space))
        study.tell(trial, 1.0)  # nothing improves: every neighbour of the baseline in turn
    moves = [t.user_attrs["cycle_move"] for t in study.trials[1:]]
    # the next choice of each parameter first, then the remaining ones
    assert moves == [
        "pooling mean->cls", "pos_encoding sinusoidal->learned", "pooling mean->last", "pos_encoding sinusoidal->none",
    ]


def test_ordered_list_steps_to_a_neighbour_and_never_skips_one():
    space = {"patch_len": MIXED["patch_len"]}
    study = optuna.create_study(sampler=CycleSampler(baseline={"patch_len": 1}, seed=0, plateau_cycles=100))
    for value in (1.0, 0.9, 0.8, 0.7):
        trial = study.ask(dict(space))
        study.tell(trial, value)  # every step up improves: the repeat stays one choice
    assert [t.params["patch_len"] for t in study.trials] == [1, 2, 4, 8]


@pytest.mark.parametrize("ceilings, tried", [(None, [16, 32, 64]), ({"batch_size": 29}, [16, 32])])
def test_batch_sizes_that_all_train_as_the_whole_split_are_one_configuration(ceilings, tried):
    """A batch never holds more series than the training split: with 29 series, 32, 64 and 128 all
    train as 29. A move between two of them was a cycle that trained exactly as its parent."""
    space = {"batch_size": CategoricalDistribution([16, 32, 64, 128]), "dropout": FloatDistribution(0.0, 0.5)}
    study = optuna.create_study(sampler=CycleSampler(baseline={"batch_size": 32, "dropout": 0.1}, seed=0,
                                                     plateau_cycles=100, ceilings=ceilings))
    for _ in range(8):
        trial = study.ask(dict(space))
        study.tell(trial, 1.0 + trial.params["dropout"])  # no batch move improves: each is tried once and left
    assert sorted({t.params["batch_size"] for t in study.trials}) == tried
    with pytest.raises(ValueError, match="ceilings must map parameter names to finite numbers"):
        CycleSampler(ceilings={"batch_size": float("inf")})


def test_duplicate_check_covers_string_parameters():
    study = run_mixed(40, plateau_cycles=100)
    configs = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(configs)) == len(configs)


def test_a_value_reached_again_by_multiplicative_steps_is_not_tried_twice():
    """8 x 1.41 and back gives 8.000000001 after rounding: the configuration of 8, tried already
    (it was a second trial of the same thing, a wasted cycle on a deterministic objective)."""
    space = {"C": FloatDistribution(1e-3, 1e3, log=True), "x": FloatDistribution(-5.0, 5.0)}
    study = optuna.create_study(sampler=CycleSampler(baseline={"C": 1.0, "x": 3.0}, seed=0))
    for _ in range(40):
        trial = study.ask(dict(space))
        study.tell(trial, (math.log10(trial.params["C"]) - 1) ** 2 + trial.params["x"] ** 2 / 10)
    seen: list[tuple[float, float]] = []
    for t in study.trials:
        c, x = t.params["C"], t.params["x"]
        twin = next((s for s in seen if math.isclose(s[0], c, rel_tol=1e-7) and math.isclose(s[1], x, abs_tol=1e-9)), None)
        assert twin is None, f"cycle {t.number + 1} ({t.user_attrs['cycle_move']}) repeats C={twin[0]}, x={twin[1]} as {c}, {x}"
        seen.append((c, x))
    assert len(seen) == 40 and study.best_value < 0.01  # the search went on past the twins it no longer makes


def test_a_move_that_lost_with_another_change_is_retried_alone():
    base = {**STEPS_BASE, "patch_len": 1}  # at its finest: no finer patch comes first
    study = optuna.create_study(sampler=CycleSampler(baseline=base, seed=0, plateau_cycles=100))
    study.tell(study.ask(dict(STEPS)), 1.0)
    # lr x2 together with another pooling: worse
    study.enqueue_trial({**base, "lr": 2e-3, "pooling": "last"})
    study.tell(study.ask(dict(STEPS)), 1.5)
    trial = study.ask(dict(STEPS))
    assert trial.user_attrs["cycle_move"] == "lr x2"
    assert trial.params == {**base, "lr": 2e-3}


def test_values_alone_are_enough():
    """No diagnosis attrs, no roles for most params: the rules run from objective values only."""
    study = run_mixed(30, plateau_cycles=4)
    assert all("diagnosis" not in t.user_attrs for t in study.trials)
    assert study.best_value < mixed_loss(MIXED_BASE)


# -- reasons, checked against the trials they name ---------------------------------------------
def check_reasons(trials: list[FrozenTrial], decided: dict[int, datetime.datetime] | None = None) -> int:
    """Every claim a reason makes about a named cycle holds for that trial; returns claims checked.

    `decided`: when each trial's decision was written (default: when the trial started)."""
    by_cycle = {t.number + 1: t for t in trials}
    decided = decided or {}
    checked = 0
    for t in trials:
        reason = t.user_attrs["cycle_reason"]
        assert reason.startswith(f"cycle {t.number + 1}: "), reason
        parent = t.user_attrs.get("cycle_parent")
        if isinstance(parent, int) and t.user_attrs.get("cycle_move") != "baseline":
            # a move names the cycle it starts from, as "cycle P" (improved, looks ..., from, back to, ...)
            assert re.search(rf"\bcycle {parent}\b", reason.split(": ", 1)[1]), reason
            checked += 1
        for m in re.finditer(r"(?:from|back to) cycle (\d+)", reason):
            assert int(m.group(1)) == parent, reason
            checked += 1
        for m in re.finditer(r"cycle (\d+) (?:\([^)]*\) )?improved ([\d.e+-]+) -> ([\d.e+-]+)", reason):
            named = by_cycle[int(m.group(1))]
            assert named.number < t.number and named.state == TrialState.COMPLETE, reason
            assert f"{named.value:.4g}" == m.group(3), reason
            checked += 1
        for m in re.finditer(r"cycle (\d+) (?:\([^)]*\) )?was worse: ([\d.e+-]+) vs ([\d.e+-]+) \(cycle (\d+)\)", reason):
            worse, best = by_cycle[int(m.group(1))], by_cycle[int(m.group(4))]
            assert f"{worse.value:.4g}" == m.group(2) and f"{best.value:.4g}" == m.group(3), reason
            assert worse.value >= best.value, reason
            checked += 1
        for m in re.finditer(r"the best is cycle (\d+) \(([\d.e+-]+)\)", reason):
            assert f"{by_cycle[int(m.group(1))].value:.4g}" == m.group(2), reason
            checked += 1
        for m in re.finditer(r"trying the opposite of cycle (\d+) \(([^)]*)\)", reason):
            other, mine = by_cycle[int(m.group(1))], by_cycle[parent]
            assert other.state.is_finished(), reason
            assert other.datetime_complete <= decided.get(t.number, t.datetime_start), reason
            changed = {k for k in other.params if other.params[k] != mine.params.get(k)}
            assert changed and changed == {k for k in t.params if t.params[k] != mine.params.get(k)}, reason
            checked += 1
        if t.user_attrs["cycle_move"] == "explore (local)":
            mine = by_cycle[parent]
            changed = [k for k in t.params if t.params[k] != mine.params.get(k)]
            assert f"{len(changed)} changes at once" in reason, reason
            checked += 1
    return checked


def test_reasons_are_true_in_one_process():
    study = run_mixed(45, plateau_cycles=4)
    assert check_reasons(study.trials) > 45


def _objective(trial: optuna.Trial) -> float:
    params = {name: trial._suggest(name, dist) for name, dist in MIXED.items()}
    time.sleep(0.15)  # long enough for the workers' trials to overlap
    return mixed_loss(params)


class _TimedSampler(CycleSampler):
    """Logs when each decision began and ended. A trial's datetime_complete is taken before its
    result is committed, and on SQLite the commit may wait for another worker's lock, so only the
    logged times say what a decision could see."""

    def __init__(self, log: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log = log

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        began = datetime.datetime.now()
        super().before_trial(study, trial)
        with self.log.open("a") as f:
            f.write(f"decided {trial.number} {began.isoformat()} {datetime.datetime.now().isoformat()}\n")


def _worker(url: str, rank: int, n_trials: int, barrier, log: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})
    sampler = _TimedSampler(log, baseline=MIXED_BASE, seed=rank)
    study = optuna.load_study(study_name="reasons", storage=storage, sampler=sampler)

    def stored(study: optuna.Study, trial: FrozenTrial) -> None:  # called once the result is committed
        with log.open("a") as f:
            f.write(f"stored {trial.number} {datetime.datetime.now().isoformat()}\n")

    barrier.wait(timeout=60)
    study.optimize(_objective, n_trials=n_trials, callbacks=[stored])


def _read_times(logs: list[Path]) -> tuple[dict[int, datetime.datetime], dict[int, datetime.datetime], dict[int, datetime.datetime]]:
    """From the workers' logs: decision began, decision written, result committed, per trial."""
    began, written, stored = {}, {}, {}
    for log in logs:
        for line in log.read_text().splitlines():
            kind, number, *times = line.split()
            stamps = [datetime.datetime.fromisoformat(s) for s in times]
            if kind == "decided":
                began[int(number)], written[int(number)] = stamps
            else:
                stored[int(number)] = stamps[0]
    return began, written, stored


def test_reasons_are_true_with_three_worker_processes_on_sqlite(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'reasons.db'}"
    optuna.create_study(study_name="reasons", storage=url)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(3)
    logs = [tmp_path / f"worker{rank}.log" for rank in range(3)]
    procs = [ctx.Process(target=_worker, args=(url, rank, 8, barrier, logs[rank])) for rank in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    trials = optuna.load_study(study_name="reasons", storage=url).trials
    assert len(trials) == 24 and all(t.state == TrialState.COMPLETE for t in trials)
    began, written, stored = _read_times(logs)
    assert len(began) == len(stored) == 24
    assert check_reasons(trials, written) > 24
    local = [tuple(sorted(t.params.items())) for t in trials if t.user_attrs["cycle_move"] != "explore (tpe)"]
    assert len(set(local)) == len(local)
    for t in trials[1:]:
        parent = parent_of(trials, t)
        if parent is None or t.user_attrs["cycle_move"] in ("explore (tpe)",):
            continue
        # the parent is the incumbent the move started from: no trial whose result was stored
        # before this decision began was better by more than the noise margin (0.2%)
        assert parent.number < t.number
        done_before = [u.value for u in trials if stored[u.number] <= began[t.number]]
        if parent.number or done_before:
            assert min(done_before) >= parent.value * (1 - 0.002) - 1e-12, t.user_attrs["cycle_reason"]
        if not t.user_attrs["cycle_move"].startswith("explore"):
            assert sum(t.params[k] != parent.params[k] for k in MIXED) == 1, t.user_attrs["cycle_reason"]
    overlapping = sum(
        a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
        for i, a in enumerate(trials) for b in trials[i + 1 :]
    )
    assert overlapping >= 3, "the workers did not run at the same time; the test proves nothing"


@pytest.mark.parametrize("diagnosis", ["underfit", "below_baseline"])
def test_below_baseline_is_treated_like_underfit(diagnosis):
    study = optuna.create_study(sampler=CycleSampler(baseline={**STEPS_BASE, "patch_len": 1}, seed=0))
    trial = study.ask(dict(STEPS))
    trial.set_user_attr("diagnosis", diagnosis)
    study.tell(trial, 1.0)
    assert study.ask(dict(STEPS)).user_attrs["cycle_move"] == "layers +1"


@pytest.mark.parametrize("diagnosis, first", [
    (None, "patch_len 2->1"), ("overfit", "patch_len 2->1"), ("underfit", "patch_len 2->1"),
    ("unstable", "lr /2"), ("diverged", "lr /2"),
])
def test_a_finer_patch_comes_before_the_training_settings_unless_training_is_in_trouble(diagnosis, first):
    study = optuna.create_study(sampler=CycleSampler(baseline=STEPS_BASE, seed=0, plateau_cycles=100))
    trial = study.ask(dict(STEPS))
    if diagnosis:
        trial.set_user_attr("diagnosis", diagnosis)
    study.tell(trial, 1.0)
    trial = study.ask(dict(STEPS))
    assert trial.user_attrs["cycle_move"] == first
    assert [k for k in STEPS if trial.params[k] != STEPS_BASE[k]] == [first.split()[0]]  # one change
    if first.startswith("patch"):
        assert "trying a finer patch before the training's settings" in trial.user_attrs["cycle_reason"]
        study.tell(trial, 1.2)  # it lost: the patch takes its usual place behind the others from then on
        assert not study.ask(dict(STEPS)).user_attrs["cycle_move"].startswith("patch")


def test_a_patch_at_its_finest_keeps_its_place():
    study = optuna.create_study(sampler=CycleSampler(baseline={**STEPS_BASE, "patch_len": 1}, seed=0))
    study.tell(study.ask(dict(STEPS)), 1.0)
    assert study.ask(dict(STEPS)).user_attrs["cycle_move"] == "lr x2"


@pytest.mark.parametrize("improves", [True, False])
def test_each_switch_is_flipped_first_once_then_takes_its_place(improves):
    space = {**MIXED, "summary": CategoricalDistribution([False, True])}
    study = optuna.create_study(sampler=CycleSampler(baseline={**MIXED_BASE, "summary": False}, seed=0))
    trial = study.ask(space)
    trial.set_user_attr("diagnosis", "overfit")  # a switch not flipped yet comes before the diagnosis too
    study.tell(trial, 1.0)
    moves = []
    for value in (0.9 if improves else 1.1, 1.2):
        trial = study.ask(space)
        moves.append(trial.user_attrs["cycle_move"])
        study.tell(trial, value)
    assert moves == ["instance_norm False->True", "summary False->True"]  # alphabetical
    # a new incumbent whose switches nobody flipped (enqueued: no move of its own to repeat)
    study.enqueue_trial({**study.best_params, "pooling": "cls"})
    study.tell(study.ask(space), study.best_value * 0.9)
    trial = study.ask(space)  # flipped once each, the switches now wait behind the other moves
    assert trial.params["instance_norm"] == study.best_params["instance_norm"], trial.user_attrs["cycle_move"]
    assert trial.params["summary"] == study.best_params["summary"], trial.user_attrs["cycle_move"]
    assert "a switch no cycle has flipped yet" in study.trials[1].user_attrs["cycle_reason"]


def test_a_local_exploration_lists_no_change_that_trains_as_before():
    """Above the batch ceiling every batch size is one configuration: an exploration that moved the
    batch from 64 to 128 there said "2 changes at once" with one of them changing nothing."""
    space = {"batch_size": CategoricalDistribution([16, 32, 64, 128]), "dropout": FloatDistribution(0.0, 0.5),
             "n_layers": IntDistribution(1, 6)}
    study = optuna.create_study(sampler=CycleSampler(baseline={"batch_size": 64, "dropout": 0.1, "n_layers": 3},
                                                     seed=0, plateau_cycles=1, ceilings={"batch_size": 29}))
    explored = 0
    for _ in range(40):
        trial = study.ask(dict(space))
        study.tell(trial, 1.0)  # nothing improves: explorations keep coming
        if trial.user_attrs["cycle_move"] == "explore (local)":
            explored += 1
            parent = study.trials[trial.user_attrs["cycle_parent"] - 1].params
            moved = {k for k in space if trial.params[k] != parent[k]
                     and not (k == "batch_size" and min(trial.params[k], parent[k]) >= 29)}
            said = trial.user_attrs["cycle_reason"].split("changes at once: ")[1]
            assert len(moved) == said.count(", ") + 1 >= 2, (trial.params, parent, said)
    assert explored >= 3
