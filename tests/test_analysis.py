"""The report's rules on hand-built cycles: samples, pruned evidence, varied params, advice inside the space, stop rule."""

from __future__ import annotations

import math

from cycle_optuna import analysis as an
from cycle_optuna.api import Cycle
from cycle_optuna.config import ParamSpace

BASE = dict(lr=1e-3, batch_size=32, hidden_dim=32, n_layers=2, n_heads=4, dropout=0.1, weight_decay=0.01)


def cyc(n: int, state: str = "COMPLETE", curve=(1.0, 0.9, 0.8), diagnosis=None, **params) -> Cycle:
    curve = list(curve)
    value = min(v for v in curve if math.isfinite(v)) if state == "COMPLETE" else None
    return Cycle(cycle=n, number=n - 1, state=state, value=value, params={**BASE, **params}, searched=dict(params),
                 key_change="", curve=curve if state != "FAIL" else [], metrics={"epochs_run": len(curve)},
                 diagnosis=diagnosis)


def test_pruned_cycles_count_as_evidence_at_their_common_epoch():
    # three complete cycles say "higher lr, lower loss"; three pruned at higher lrs say the opposite
    cycles = [cyc(1, lr=1e-3, curve=[1.0, 0.95, 0.90]), cyc(2, lr=2e-3, curve=[0.98, 0.93, 0.85]),
              cyc(3, lr=4e-3, curve=[0.97, 0.92, 0.80]),
              cyc(4, "PRUNED", lr=8e-3, curve=[1.3, 1.2]), cyc(5, "PRUNED", lr=1.6e-2, curve=[1.4, 1.35]),
              cyc(6, "PRUNED", lr=3.2e-2, curve=[1.5])]
    assert an.common_epoch(cycles) == 1
    t = an.trend(cycles, lambda c: math.log(c.params["lr"]))
    assert t.epoch == 1 and str(t.n) == "3 complete, 3 pruned"
    assert t.direction == 1  # at epoch 1 the pruned high-lr cycles are the worst
    assert t.rho_complete is not None and t.rho_complete < 0 and t.contradicted


def test_complete_cycles_alone_are_too_few_for_a_trend():
    cycles = [cyc(1, lr=1e-3), cyc(2, lr=2e-3, curve=[1.0, 0.7]), cyc(3, lr=4e-3, curve=[1.0, 0.6])]
    t = an.trend(cycles, lambda c: math.log(c.params["lr"]))
    assert t.rho is None and t.direction == 0 and str(t.n) == "3 complete, 0 pruned"


def test_a_trend_carried_by_one_or_two_cycles_that_moved_the_quantity_is_not_stated():
    """Seven cycles, one larger model and one smaller: rho came from those two alone and read as
    "larger models performed better" although the one larger model lost to its parent."""
    sizes = [32, 32, 64, 16, 32, 32, 32]
    cycles = [cyc(i + 1, hidden_dim=h, curve=[1.0, 0.9 - 0.01 * i]) for i, h in enumerate(sizes)]
    assert an.trend(cycles, lambda c: float(c.params["hidden_dim"])).rho is None
    sizes = [32, 32, 64, 16, 128, 32, 32]  # three away from the most common value: enough to state one
    cycles = [cyc(i + 1, hidden_dim=h, curve=[1.0, 0.9 - 0.01 * i]) for i, h in enumerate(sizes)]
    assert an.trend(cycles, lambda c: float(c.params["hidden_dim"])).rho is not None


def test_diverged_and_failed_cycles_are_not_loss_evidence():
    cycles = [cyc(1), cyc(2, "PRUNED", curve=[1.3, float("nan")], diagnosis="diverged"), cyc(3, "FAIL")]
    assert [c.cycle for c in an.informative(cycles)] == [1]
    assert an.loss_at(cycles[0], 2) == 0.9 and an.loss_at(cycles[0], 4) is None


def test_a_parameter_that_never_varied_is_not_rated():
    cycles = [cyc(1, lr=1e-3, dropout=0.1), cyc(2, lr=2e-3, dropout=0.1), cyc(3, "PRUNED", lr=3e-3, dropout=0.3)]
    assert an.varied(cycles, ["lr", "dropout", "n_layers"]) == ["lr"]  # dropout moved only in a pruned cycle
    assert "only 2 complete cycles (fewer than 10)" in an.importance_warning(2)
    assert an.importance_warning(10) == ""


SPACE = {"n_layers": ParamSpace("n_layers", low=1, high=4), "hidden_dim": ParamSpace("hidden_dim", choices=(1, 2, 4)),
         "dropout": ParamSpace("dropout", low=0.0, high=0.9), "lr": ParamSpace("lr", low=1e-4, high=1.0, log=True),
         "n_heads": ParamSpace("n_heads", choices=(1, 2))}


def test_recommendations_stay_inside_what_the_model_accepts():
    # the best sits at every lower edge: n_layers 1, hidden_dim 1, dropout 0, n_heads 1 -- nothing below is valid
    best = cyc(1, n_layers=1, hidden_dim=1, dropout=0.0, n_heads=1, lr=0.01, curve=[0.5])
    recs = an.recommendations([best, cyc(2, curve=[0.9])], best, SPACE)
    text = "\n".join(r for r in recs if not r.startswith("Use cycle"))  # the baseline line names every param
    assert "n_layers" not in text and "hidden_dim" not in text and "dropout" not in text and "n_heads" not in text
    # and at the upper edges: lr 1.0 and dropout 0.9 are the model's limits already
    best = cyc(1, n_layers=4, hidden_dim=4, dropout=0.9, lr=1.0, n_heads=2, curve=[0.5])
    recs = an.recommendations([best, cyc(2, curve=[0.9])], best, SPACE)
    text = "\n".join(r for r in recs if not r.startswith("Use cycle"))
    assert "widen the range upwards (e.g. high = 6)" in text and "add a larger choice (e.g. 8)" in text
    assert "dropout" not in text and "Best lr" not in text
    assert len(recs) == len(set(recs))


def test_recommendations_are_consistent():
    cycles = [cyc(i, lr=1e-3 * i, hidden_dim=2 if i % 2 else 4, curve=[1.0, 1.0 - 0.01 * i]) for i in range(1, 13)]
    best = min(cycles, key=lambda c: c.value)
    recs = an.recommendations(cycles, best, SPACE, importance={"lr": 0.9, "hidden_dim": 0.01, "dropout": 0.01})
    focus = next(r for r in recs if r.startswith("Focus on lr"))
    assert "hidden_dim" not in focus  # widened (largest choice), so never also "fix hidden_dim"
    assert "fix dropout" in focus
    assert any("hidden_dim 4 is the largest choice" in r for r in recs)
    # below 10 complete cycles importances are indicative only: no "focus"/"fix" advice from them
    recs = an.recommendations(cycles[:5], cycles[4], SPACE, importance={"lr": 0.9, "dropout": 0.01})
    assert not [r for r in recs if r.startswith("Focus")]


def test_stop_advice_follows_the_stated_rule():
    improving = [cyc(1, curve=[1.0])] + [cyc(i, curve=[1.0 - 0.1 * i]) for i in range(2, 5)]
    flat = [cyc(i, curve=[0.61 - 0.0001 * i]) for i in range(5, 13)]  # better, but by less than the noise margin
    verdict = an.plateau(improving + flat)
    assert verdict.since == 8 and verdict.finished == 12 and verdict.stop
    recs = an.recommendations(improving + flat, flat[-1], {})
    assert any(r.startswith("Stop, or change the space: no new best in the last 8 finished cycles (rule: stop when 8")
               for r in recs)
    short = an.plateau(improving + flat[:7])
    assert short.since == 7 and not short.stop
    assert not [r for r in an.recommendations(improving + flat[:7], improving[-1], {}) if r.startswith("Stop")]
    # a long flat run in a small study is not enough either
    small = an.plateau([cyc(1, curve=[0.5])] + [cyc(i, curve=[0.9]) for i in range(2, 10)])
    assert small.since == 8 and not small.stop


def test_no_range_advice_for_a_parameter_the_complete_cycles_never_moved():
    # one complete cycle (the baseline) sits at the largest n_heads choice: that says nothing about n_heads
    best = cyc(1, n_heads=2, curve=[0.5])
    recs = an.recommendations([best, cyc(2, "PRUNED", n_heads=1, curve=[1.2])], best, SPACE)
    assert not [r for r in recs if r.startswith("Best ")]


def test_nothing_complete_means_run_the_study():
    assert an.recommendations([cyc(1, "RUNNING", curve=[1.2])], None, SPACE) == ["Run the study: no cycle has completed yet."]
    # every cycle ended without a value: more of the same would not help
    done = an.recommendations([cyc(1, "PRUNED", curve=[1.2]), cyc(2, "FAIL")], None, SPACE)
    assert done[0].startswith("No cycle completed: all 2 were pruned, diverged or failed")
    assert an.plateau([cyc(1, "PRUNED", curve=[1.2])]) is None


def test_the_next_baseline_advice_pastes_into_a_study_file():
    """It read `[baseline] lr = 0.0061, pos_encoding = sinusoidal, instance_norm = False`: not TOML
    (a bare string, Python's False, commas between keys) and lr rounded to 4 digits."""
    import re
    import tomllib

    best = cyc(1, lr=0.0061234567, pos_encoding="sinusoidal", instance_norm=False, summary_features=True, curve=[0.5])
    advice = next(r for r in an.recommendations([best, cyc(2, curve=[0.9])], best, SPACE) if r.startswith("Use cycle"))
    assert advice.startswith("Use cycle 1 as the next baseline, in [baseline]: `")
    pasted = tomllib.loads("\n".join(re.findall(r"`([^`]*)`", advice)))
    assert pasted == best.params
