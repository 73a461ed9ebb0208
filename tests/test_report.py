"""Cycle report: sections, numbers from the study, data-derived recommendations, real PNG plots."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image
import optuna
import pytest

from cycle_optuna import api, plots, report
from conftest_report import make_study

SECTIONS = (
    "## Overview", "## Best configuration (cycle", "## Performance metrics across cycles", "## Key insights",
    "### 1. Model capacity vs performance", "### 2. Learning rate impact", "### 3. Training dynamics",
    "### 4. Parameter importances", "### 5. Epochs saved by pruning", "### What worked", "### What failed",
    "## Recommendations for the next run", "## Loss reduction analysis", "## Plots", "## Conclusion",
)
ROOT = Path(__file__).resolve().parents[1]
PNGS = ("history.png", "curves.png", "lr_vs_loss.png", "capacity_vs_loss.png", "importances.png")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    tmp = tmp_path_factory.mktemp("report")
    out = {}
    for variant in ("cycle", "tpe"):
        path = report.write_report(make_study(tmp / variant, variant), tmp / f"{variant}-out")
        out[variant] = (path, path.read_text())
    return out


def test_report_has_every_section_and_plot(written):
    path, text = written["cycle"]
    for heading in SECTIONS:
        assert heading in text, heading
    for png in PNGS:
        assert f"]({png})" in text
        assert (path.parent / png).stat().st_size > 10_000, png


@pytest.mark.parametrize("png", PNGS)
def test_plots_are_real_pngs_of_sensible_size(written, png):
    for path, _ in written.values():
        file = path.parent / png
        assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        h, w, _ = matplotlib.image.imread(file).shape
        assert 300 <= h <= 2000 and 500 <= w <= 2000


def test_numbers_come_from_the_study(written):
    path, text = written["cycle"]
    assert "Best validation loss **0.9192** in cycle 1 (of 3 complete cycles): no later cycle beat the baseline" in text
    assert "**Validation accuracy:** 47.09%" in text
    score = api.held_out_score(path.parent.parent / "cycle" / "cycle.toml")
    assert f"**Held-out test accuracy:** {100 * score.accuracy:.2f}%" in text
    table = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(table) == 6
    assert table[0].startswith("| 1 | 0.9192 **best** | 47.09% | 0.84% | baseline configuration | complete (converged)")
    assert table[3].endswith("| diverged |") and "pruned at epoch 2" in table[4] and table[5].endswith("| fail |")
    assert "(3 complete, 1 pruned, 1 diverged, 1 failed)" in text
    # cycles 4 and 5 ran 2 of 4 epochs each: 4 epochs saved of the 24-epoch budget
    assert ("Pruning stopped 1 cycle and stopped 1 that diverged, saving up to **4 epochs** (16.7% of the 24-epoch "
            "budget of 6 cycles)") in text
    assert "**Sequence:** 0.0005 -> 0.001 -> 0.002 -> 0.004 -> 0.001 -> 0.00025" in text
    # 4 cycles to compare: too few for a trend, and the report says so with its sample
    assert ("Too few cycles with different capacities to relate them to loss (3 complete, 1 pruned; a trend "
            "needs 6 complete or pruned cycles, at least 3 of them away from the most common value)") in text
    assert "**Finding:**" not in text
    assert "**Cycle 3** had the best accuracy of the 3 complete cycles (47.68%) despite not having the best loss" in text
    # each listed cycle says what it tried: its change against its parent
    assert "cycle 4 (lr x2: lr 0.002 -> 0.004, n_layers 4 -> 5): diverged: the loss became non-finite" in text
    assert "cycle 6 (lr /2: lr 0.0005 -> 0.00025, hidden_dim 64 -> 32): CUDA out of memory" in text
    assert "**Largest drop within a cycle** (its first epoch's val loss to its best): 3.15% (cycle 3)" in text
    assert "loss of complete cycles in 0.9192 - 0.9213" in text


def test_recommendations_are_derived_from_the_data(written):
    _, cyc = written["cycle"]
    _, tpe = written["tpe"]
    assert "Keep the learning rate below 0.004: 1 cycle diverged" in cyc
    # 5 cycles without progress: short of the stated stop rule, so no "stop" advice
    assert "Keep going: 5 finished cycles since the last new best by more than 0.5%, short of the stop rule (stop when 8" in cyc
    assert "Stop" not in cyc
    # best lr 0.0039 of [1e-4, 4e-3]: at the edge of the range -> widen it
    assert "Best lr 0.0039 sits at the upper edge of [0.0001, 0.004]: widen the range upwards (e.g. high = 0.008)" in tpe
    assert "Best hidden_dim 32 is the largest choice of [16, 32]: add a larger choice (e.g. 64)" in tpe
    assert "still improving at its last epoch: raise train.epochs" in tpe
    assert "The last finished cycle set the best loss: run more cycles" in tpe
    assert "upper edge" not in cyc and "plateaued" not in tpe


def test_two_studies_give_visibly_different_reports(written):
    _, cyc = written["cycle"]
    _, tpe = written["tpe"]
    assert "## Best configuration (cycle 1)" in cyc and "## Best configuration (cycle 5)" in tpe
    assert "**0.6400** in cycle 5 (of 4 complete cycles), 34.02% below cycle 1 (0.9700)" in tpe
    assert "Too few cycles with different learning rates to relate them to loss (4 complete, 1 pruned" in tpe
    assert "lr 0.0005 -> 0.001, n_layers 1 -> 2" in tpe  # TPE: key changes are parameter differences
    assert "lr x2: lr 0.0005 -> 0.001" in cyc  # cycle sampler: its move first
    assert "sampler `cycle`" in cyc and "sampler `tpe`" in tpe
    # the fixed hyperparameters (model knobs at their defaults) are listed alike in both
    shared = {line for line in set(cyc.splitlines()) & set(tpe.splitlines()) if not line.endswith("(fixed)")}
    assert len(shared) < 0.3 * len(cyc.splitlines())


def test_importances_use_optunas_evaluator(written, tmp_path):
    path, text = written["tpe"]
    study = api.load_study(path.parent.parent / "tpe" / "tpe.toml")
    expected = optuna.importance.get_param_importances(study, params=["dropout", "hidden_dim", "lr", "n_layers"])
    top = next(iter(expected))
    assert f"| {top} | {expected[top]:.3f} |" in text
    assert "**Warning:** only 4 complete cycles (fewer than 10)" in text


def test_report_of_a_study_without_completed_cycles(tmp_path):
    study = optuna.create_study(study_name="fresh", storage=f"sqlite:///{tmp_path / 'f.db'}")
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.PRUNED, params={}, distributions={}, intermediate_values={0: 1.2},
        user_attrs={"prune_reason": "fell behind", "epochs_run": 1},
    ))
    path = report.write_report(study, tmp_path / "out", test=False)
    text = path.read_text()
    # its only cycle ended pruned and nothing runs: waiting would not help, so the report says what happened
    assert "No cycle completed: every one was pruned, diverged or failed." in text
    assert "1. No cycle completed: its only cycle was pruned, diverged or failed" in text
    # a study other code made: its cycle's own parameters (none), not this project's defaults as if its baseline
    assert "cycle 1 (baseline configuration: no parameters)" in text and "fell behind" in text
    assert all((path.parent / png).stat().st_size > 5_000 for png in PNGS)


def test_a_pruned_cycle_shows_the_best_loss_it_reached_not_its_last(tmp_path):
    """Optuna's value of a pruned trial is its last reported epoch; the table and plots say "best"."""
    study = optuna.create_study(study_name="p", storage=f"sqlite:///{tmp_path / 'p.db'}")
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.50, params={},
                                              distributions={}, intermediate_values={0: 0.7, 1: 0.5}))
    trial = study.ask()
    for step, v in enumerate((0.6, 0.4184, 0.4535)):
        trial.report(v, step)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # as a worker's pruned trial ends
    assert study.trials[1].value == 0.4535  # what Optuna keeps: the last epoch
    text = report.write_report(study, tmp_path / "out", test=False).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    assert row.startswith("| 2 | 0.4184 |"), row


def test_cycles_that_tie_on_accuracy_share_it(tmp_path):
    study = optuna.create_study(study_name="t", storage=f"sqlite:///{tmp_path / 't.db'}")
    for value in (0.30, 0.20):  # both 100% accurate; the second has the lower loss
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=value, params={},
                                                  distributions={}, intermediate_values={0: value},
                                                  user_attrs={"val_accuracy": 1.0}))
    text = report.write_report(study, tmp_path / "out", test=False).read_text()
    assert ("**Cycles 1 and 2** shared the best accuracy of the 2 complete cycles (100.00%); cycle 2, one of them, "
            "also had the best loss") in text
    assert "despite" not in text


def test_default_output_dir_is_beside_the_study_file(tmp_path, monkeypatch):
    path = make_study(tmp_path, "tpe")
    monkeypatch.setattr(api, "held_out_score", lambda *a, **k: (_ for _ in ()).throw(api.StorageError("skip")))
    out = report.write_report(path)
    assert out == tmp_path / "tpewide-report" / "report.md"
    assert "unavailable (skip)" in out.read_text()


def test_plots_colour_by_outcome_with_the_best_distinct(tmp_path, monkeypatch):
    cyc = api.cycles(api.load_study(make_study(tmp_path, "cycle")))
    drawn = {}
    real = plots._save

    def grab(fig, path):
        ax = fig.axes[0]
        drawn[path.name] = ({line.get_gid(): line.get_color() for line in ax.get_lines() if line.get_gid()},
                            [t.get_text() for t in ax.get_legend().get_texts()], ax)
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", grab)
    plots.curves(cyc, tmp_path / "c.png")
    colours, legend, _ = drawn["c.png"]
    # every cycle with a curve is drawn, coloured by its outcome; the best (cycle 1) in its own colour
    assert colours == {"cycle 1": plots.BEST_COLOR, "cycle 2": plots.STATES["complete"],
                       "cycle 3": plots.STATES["complete"], "cycle 4": plots.STATES["diverged"],
                       "cycle 5": plots.STATES["pruned"]}
    # the best is counted with its outcome, as the history plot and the text count it (it said 2 of 3)
    assert legend == ["complete (3)", "pruned (1)", "diverged (1)", "best: cycle 1"]
    plots.history(cyc, tmp_path / "h.png")
    assert drawn["h.png"][1] == ["complete (3)", "diverged (1)", "pruned (1)", "failed (1)", "best cycle",
                                 "best so far"]


def test_the_capacity_plot_shows_pruned_cycles_that_changed_the_size(tmp_path, monkeypatch):
    """A pruned cycle stores no parameter count: plotted by count, a pruned cycle of a size no complete
    cycle had was left out (the very cycles that changed the size), while the text's trend counted it."""
    base = {"lr": 1e-3, "hidden_dim": 32, "n_layers": 2}
    cyc = [api.Cycle(cycle=1, number=0, state="COMPLETE", value=0.5, params=base, searched={}, key_change="",
                     curve=[0.9, 0.5], metrics={"n_params": 20000}),
           api.Cycle(cycle=2, number=1, state="PRUNED", value=0.8, params={**base, "n_layers": 4}, searched={},
                     key_change="", curve=[0.95, 0.8], metrics={}),
           api.Cycle(cycle=3, number=2, state="PRUNED", value=0.85, params={**base, "hidden_dim": 64}, searched={},
                     key_change="", curve=[0.97, 0.85], metrics={})]
    points = {}
    real = plots._save

    def grab(fig, path):
        points[path.name] = sum(len(c.get_offsets()) for c in fig.axes[0].collections)
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", grab)
    plots.capacity_vs_loss(cyc, tmp_path / "cap.png")
    assert points["cap.png"] == 3 + 1  # every cycle, and the best's star over its point


def test_scatter_labels_never_overlap(tmp_path, monkeypatch):
    """30 cycles crowded at a few learning rates: labels that would collide are left out."""
    cyc = api.cycles(api.load_study(make_study(tmp_path, "cycle")))
    crowd = [api.Cycle(cycle=i, number=i - 1, state="COMPLETE", value=0.9 + 0.001 * i, params={"lr": 1e-3 * (1 + i % 3)},
                       searched={}, key_change="", curve=[1.0, 0.9], metrics={}) for i in range(1, 30)]
    crowd.append(api.Cycle(cycle=30, number=29, state="PRUNED", value=None, params={"lr": 0.01}, searched={},
                           key_change="", curve=[2.0], metrics={}))  # squeezes the other 29 into a band
    boxes = []
    real = plots._save

    def grab(fig, path):
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        boxes.extend(t.get_window_extent(r) for t in fig.axes[0].texts)
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", grab)
    plots.lr_vs_loss(crowd, tmp_path / "lr.png")
    assert 3 <= len(boxes) < 30  # some labels placed, crowded ones left out
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert cyc  # the fixture study loads


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_end_to_end_on_a_real_study(quick_study):
    """Real trials from the lead's worker, then the report, the held-out score and the model."""
    import numpy as np

    from cycle_optuna import config, storage, worker

    cfg = config.override(config.load(quick_study), n_trials=2)
    worker.run_worker(cfg, storage.resolve_url(cfg))
    text = report.write_report(quick_study).read_text()
    best = api.best_trial(quick_study)
    assert f"## Best configuration (cycle {best.number + 1})" in text and f"{best.value:.4f}" in text
    score = api.held_out_score(quick_study)
    assert f"**Held-out test accuracy:** {100 * score.accuracy:.2f}%" in text
    model = api.load_best_model(quick_study)
    assert model.predict(np.zeros((2, model.seq_len, model.n_features))).shape == (2,)


def test_the_result_is_put_in_context(tmp_path):
    path = make_study(tmp_path, "tpe", with_model=False)
    study = api.load_study(path)
    text = report.write_report(study, tmp_path / "plain", test=False).read_text()
    assert "Bayes-optimal oracle" in text and "baselines" not in text.lower()  # none stored: none shown
    study.set_user_attr("cycle_optuna_baselines", {
        "majority": {"label": "majority class", "val_accuracy": 0.3333, "test_accuracy": 0.3333,
                     "test_balanced_accuracy": 0.3333},
        "mlp": {"label": "MLP", "val_accuracy": 0.4, "test_accuracy": 0.8, "test_balanced_accuracy": 0.5},
        "1nn": {"label": "1-NN", "val_accuracy": 0.5, "test_accuracy": None}})
    text = report.write_report(study, tmp_path / "ctx", test=False).read_text()
    line = next(x for x in text.splitlines() if x.startswith("- **In context**"))
    assert line.startswith("- **In context** (validation accuracy 74.0%): chance 33.3%; majority class 33.3%, "
                           "test 33.3%; MLP 40.0%, test 80.0% (balanced 50.0%); 1-NN 50.0%; Bayes-optimal oracle ")
    assert re.search(r"reaches \d+% of the oracle's accuracy$", line)


def test_under_cross_validation_the_oracle_is_scored_on_the_series_the_cycles_are(tmp_path):
    """Cross-validated cycles are scored over the pooled train and val series: the oracle was
    scored on the val split alone, so "reaches N% of the oracle" compared two sets of series."""
    import numpy as np

    from cycle_optuna.data import bayes_predict, make_synthetic, stratified_split

    path = make_study(tmp_path, "tpe", with_model=False)
    study = api.load_study(path)
    stats = dict(study.user_attrs[api.STATS_ATTR], folds=5)
    study.set_user_attr(api.STATS_ATTR, stats)
    cfg = api.study_config(study)
    x, y = make_synthetic(cfg.data, cfg.study.seed)
    tr, va, _ = stratified_split("s", y, cfg.data.n_classes, cfg.data.val_fraction, cfg.data.test_fraction, cfg.study.seed)
    pooled = np.concatenate([tr, va])
    oracle = float(np.mean(bayes_predict(cfg.data, x[pooled]) == y[pooled]))
    text = report.write_report(study, tmp_path / "cv", test=False).read_text()
    line = next(x for x in text.splitlines() if x.startswith("- **In context**"))
    assert f"Bayes-optimal oracle {100 * oracle:.1f}% on the {len(pooled)} cross-validated series" in line, line


def test_the_oracle_is_left_out_where_its_covariance_would_take_gigabytes():
    """The Bayes oracle inverts a (seq_len x informative channels)-square covariance per class: a
    long synthetic task is reported without it rather than after minutes of linear algebra."""
    from dataclasses import replace

    from cycle_optuna import config

    cfg = config.load(ROOT / "studies" / "quick.toml")
    small = report._bayes(cfg)
    assert small is not None and 0.33 < small["test"] <= 1
    long = replace(cfg, data=replace(cfg.data, seq_len=3000, n_features=4, n_samples=60))  # 3000 x 2 channels
    assert report._bayes(long) is None


def test_an_interrupted_cycle_that_was_retried_is_not_counted_as_failed(tmp_path):
    import warnings

    study = optuna.create_study(study_name="r", storage=f"sqlite:///{tmp_path / 'r.db'}")
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.5, params={},
                                              distributions={}, intermediate_values={0: 0.7, 1: 0.5}))
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, params={}, distributions={}, intermediate_values={0: 0.6},
        user_attrs={"fail_cause": "worker interrupted (vm:1, SIGINT)", "cycle_reason": "cycle 2: trying lr x2"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # create_trial's system_attrs: how Optuna's retry callback marks a retry
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, value=0.45, params={}, distributions={},
            intermediate_values={0: 0.6, 1: 0.45}, user_attrs={"cycle_reason": "cycle 2: trying lr x2"},
            system_attrs={"failed_trial": 1, "retry_history": [1]}))
    cyc = api.cycles(study)
    assert (cyc[1].retried_as, cyc[2].retry_of) == (3, 2)
    assert cyc[1].reason == "worker interrupted (vm:1, SIGINT); retried as cycle 3"
    assert cyc[2].reason == "retry of cycle 2, from its last checkpoint"
    assert cyc[2].key_change == "retry of cycle 2"  # not "no change" against the cycle it reruns
    text = report.write_report(study, tmp_path / "out", test=False).read_text()
    assert "(2 complete, 0 pruned, 0 diverged, 0 failed, 1 interrupted and retried)" in text
    assert "- **Failed:** 0" in text and "- **Interrupted and retried:** 1" in text
    assert "cycle 2 (no change: no parameters)" in text and "SIGINT); retried as cycle 3" in text
    assert "None" not in text, [ln for ln in text.splitlines() if "None" in ln]  # no value of a parameter it lacks


def test_a_report_onto_a_full_disk_is_one_line_naming_it_and_exit_2(tmp_path, capsys):
    from cycle_optuna.cli import main
    from workers_helpers import fill_disk, small_tmpfs

    study = make_study(tmp_path, "tpe", with_model=False)
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        assert main(["report", str(study), "-o", str(disk / "old"), "--no-test"]) == 0
        before = {p.name: p.read_bytes() for p in (disk / "old").iterdir()}
        (disk / "old" / "report.md").write_text("the report of last week")
        fill_disk(disk)
        capsys.readouterr()
        assert main(["report", str(study), "-o", str(disk / "out"), "--no-test"]) == 2
        assert not (disk / "out").exists()  # no partial plot or report left, nor the folder it made
        assert main(["report", str(study), "-o", str(disk / "old"), "--no-test"]) == 2
        # an earlier report stays whole: no new plot beside the old report.md
        after = {p.name: p.read_bytes() for p in (disk / "old").iterdir()}
        assert after == {**before, "report.md": b"the report of last week"}
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"error: cannot write {disk / 'out'}: No space left on device"
    assert err.splitlines()[-1] == f"error: cannot write {disk / 'old'}: No space left on device"


def test_the_report_command_names_the_plots_it_wrote_not_other_pictures_there(tmp_path, capsys):
    from cycle_optuna.cli import main

    study = make_study(tmp_path, "tpe", with_model=False)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "holiday.png").write_bytes(b"\x89PNG")
    assert main(["report", str(study), "-o", str(tmp_path / "pics"), "--no-test"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "with 5 plots (" in out and "holiday.png" not in out
    assert (tmp_path / "pics" / "holiday.png").read_bytes() == b"\x89PNG"
    assert not [p for p in (tmp_path / "pics").iterdir() if p.name.startswith(".")]  # no staging folder left


def test_pruning_savings_leave_out_cycles_early_stopping_would_have_ended_as_soon():
    """The report charged every epoch a pruned cycle did not run to pruning, also where the
    trainer's early stopping (patience, min_delta) would have ended it at the same epoch."""
    from cycle_optuna.report_markdown import _early_stop_at

    assert _early_stop_at([1.0, 0.9, 0.95, 0.96], 2, 1e-4, 10) == 4  # two epochs without a new best
    assert _early_stop_at([1.0, 0.9, 0.8], 2, 1e-4, 10) is None  # still improving: pruning saved the rest
    assert _early_stop_at([1.0, 0.9, 0.89995, 0.8999], 2, 1e-4, 10) == 4  # gains below min_delta do not count
    assert _early_stop_at([1.0, 1.0, 1.0], 2, 1e-4, 3) is None  # never at the last epoch, as the trainer
    assert _early_stop_at([1.0, 1.1, 1.2], 0, 1e-4, 10) is None  # patience 0: early stopping off


def test_a_new_best_within_the_noise_threshold_is_marked_as_such():
    """Cycles 0.3000 -> 0.2995: 'What worked' listed the new best while the recommendation, which
    counts only bests by more than 0.5%, said none had come: both now say which rule they apply."""
    from cycle_optuna.api import Cycle
    from cycle_optuna.report_markdown import _worked

    def cycle(n: int, value: float) -> Cycle:
        return Cycle(cycle=n, number=n - 1, state="COMPLETE", value=value, params={}, searched={},
                     key_change=f"change {n}", curve=[value], metrics={})

    from types import SimpleNamespace

    cycles = [cycle(1, 0.3000), cycle(2, 0.2995), cycle(3, 0.2500)]
    a = SimpleNamespace(cycles=cycles, best=cycles[2], cfg=None, diverged=[], failed=[], importance={}, pruned=[],
                        retried=[], test=None)
    text = "\n".join(_worked(a))  # type: ignore[arg-type]
    assert "Cycle 2: change 2 lowered the best loss 0.3000 -> 0.2995 (0.17%; within the noise threshold" in text
    assert "Cycle 3: change 3 lowered the best loss 0.2995 -> 0.2500 (16.53%)\n" in text + "\n"


def test_a_long_list_of_pruned_cycles_says_how_many_it_leaves_out(tmp_path):
    study = optuna.create_study(study_name="many", storage=f"sqlite:///{tmp_path / 'm.db'}")
    for k in range(12):
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.PRUNED, params={}, distributions={}, intermediate_values={0: 1.0 + k},
            user_attrs={"prune_reason": f"reason {k}", "epochs_run": 1}))
    text = report.write_report(study, tmp_path / "out", test=False).read_text()
    assert "reason 9" in text and "reason 10" not in text
    assert "  - and 2 more (cycles 11, 12; the table above lists every cycle)" in text


def test_the_importance_caveat_names_what_the_sampler_changed(written):
    """It said "each a single change" of every study; a TPE study's cycles change several parameters."""
    cyc, tpe = written["cycle"][1], written["tpe"][1]
    assert "compare the cycles that changed it in the table above" in cyc and "several parameters" not in cyc
    assert "its cycles changed several parameters at once" in tpe and "compare the cycles" not in tpe


@pytest.mark.parametrize("attrs", [{"val_accuracy": float("nan")}, {"n_params": float("nan")},
                                   {"n_params": 10**30}, {"val_accuracy": "0.9"}])
def test_attrs_no_worker_writes_are_left_out_not_a_crash(tmp_path, attrs):
    """Trials added by other code: NaN, out-of-range or string figures crashed report (IndexError,
    matplotlib's log scale, numpy's log10) and best (a string accuracy)."""
    import json

    study = optuna.create_study(study_name="odd", storage=f"sqlite:///{tmp_path / 'o.db'}")
    for i, value in enumerate((0.5, 0.4)):
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, value=value, params={}, distributions={},
            intermediate_values={0: value + 0.1, 1: value},
            user_attrs={"val_accuracy": 0.5, "n_params": 1000 * (i + 1), **(attrs if i else {})}))
    text = report.write_report(study, tmp_path / "out", test=False).read_text()
    assert "## Conclusion" in text and "nan" not in text.lower()
    rec = api.best_record(study, with_test=False)
    json.loads(json.dumps(rec), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert rec["cycle"] == 2
    assert [c.val_accuracy for c in api.cycles(study)][1] == (0.5 if "val_accuracy" not in attrs else None)


def test_best_record_of_an_infinite_value_is_strict_json(tmp_path):
    import json

    study = optuna.create_study(study_name="inf", storage=f"sqlite:///{tmp_path / 'i.db'}")
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=float("-inf"),
                                              params={}, distributions={}, user_attrs={"val_accuracy": 0.5}))
    rec = api.best_record(study, with_test=False)
    assert rec["value"] is None
    json.loads(json.dumps(rec), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


def test_a_report_of_an_empty_study_shows_no_placeholder(tmp_path):
    study = optuna.create_study(study_name="e", storage=f"sqlite:///{tmp_path / 'e.db'}")
    text = report.write_report(study, tmp_path / "out", test=False).read_text()
    assert "No cycle yet: no learning rate to show" in text and "stayed at ?" not in text


def test_a_report_of_a_study_it_may_not_write_is_written_and_says_the_notes_were_not(tmp_path, capsys, caplog, pg_url):
    """A role that may only read the study: report.md and the plots are written; the dashboard
    notes the report refreshes are not, which one warning says, and the command exits 0."""
    from optuna_dashboard._note import get_note_from_system_attrs

    from conftest import pg_reader
    from cycle_optuna.cli import main
    from cycle_optuna.optuna_internals import storage_of, study_id_of
    from workers_helpers import write_study

    path = write_study(tmp_path, n_trials=2, epochs=1, n_samples=60)
    assert main(["worker", str(path), "--storage", pg_url]) == 0  # a worker leaves the study note to `run` and `report`
    caplog.clear()
    with pg_reader(pg_url) as reader:
        assert main(["report", str(path), "--storage", reader, "-o", str(tmp_path / "rep"), "--no-test"]) == 0
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == sorted(["report.md", *PNGS])
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "report.md written; the study's dashboard notes were not refreshed" in warning, warning
    assert "permission denied" in warning, warning
    assert "report of study" in capsys.readouterr().out
    study = api.load_study(path, storage=pg_url)
    assert get_note_from_system_attrs(storage_of(study).get_study_system_attrs(study_id_of(study)), None)["body"] == ""
