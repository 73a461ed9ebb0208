"""The best model averages the `[study] ensemble` best cycles: which models are kept, what it predicts."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from cycle_optuna import api, config, storage, worker
from cycle_optuna.best_model import Ensemble
from cycle_optuna.errors import ConfigError
from cycle_optuna.data import load_study_data


def _run(quick_study, n_trials: int, ensemble: int) -> optuna.Study:
    text = quick_study.read_text().replace("seed = 0", f"seed = 0\nensemble = {ensemble}", 1)
    text = text.replace("[pruner]\ntype = \"parent\"", "[pruner]\ntype = \"none\"")  # every trial completes
    quick_study.write_text(text.replace("n_trials = 3", f"n_trials = {n_trials}"))
    cfg = config.load(quick_study)
    return worker.run_worker(cfg, storage.resolve_url(cfg))


def test_the_best_model_averages_the_top_cycles_and_only_their_models_are_kept(quick_study):
    study = _run(quick_study, n_trials=5, ensemble=2)
    done = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert len(done) == 5
    top = [t.number for t in done[:2]]
    # a trial's model is kept only when it ranked among the best 2 as it finished
    for t in done:
        earlier_better = sum(o.value <= t.value for o in done if o.datetime_complete < t.datetime_complete)
        assert ("model_artifact_id" in t.user_attrs) == (earlier_better < 2), t.number
    model = api.load_best_model(quick_study)
    assert model.trial_numbers == top and model.trial_number == top[0]
    assert isinstance(model.net, Ensemble) and len(model.net.nets) == 2

    cfg = api.study_config(study)
    data = load_study_data(cfg)
    raw = data.x_test.numpy() * data.std + data.mean
    singles = [api.load_best_model(quick_study, ensemble=1)]
    assert singles[0].trial_numbers == [top[0]] and not isinstance(singles[0].net, Ensemble)
    # the second member alone, as the ensemble holds it
    second = model.net.nets[1]
    with torch.inference_mode():
        p2 = torch.softmax(second(data.x_test), dim=-1).numpy()
    expected = (singles[0].predict_proba(raw) + p2) / 2
    assert np.allclose(model.predict_proba(raw), expected, atol=1e-5)
    assert np.array_equal(model.predict(raw), expected.argmax(1))

    score = api.held_out_score(quick_study)
    assert score.cycles == tuple(n + 1 for n in top) and score.cycle == top[0] + 1
    assert score.accuracy == pytest.approx(float((expected.argmax(1) == data.y_test.numpy()).mean()))
    rec = api.best_record(quick_study)
    assert rec["model_cycles"] == [n + 1 for n in top]


def test_ensemble_one_keeps_only_new_bests(quick_study):
    study = _run(quick_study, n_trials=4, ensemble=1)
    done = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    best_so_far = float("inf")
    for t in done:
        assert ("model_artifact_id" in t.user_attrs) == (t.value < best_so_far), t.number
        best_so_far = min(best_so_far, t.value)
    model = api.load_best_model(quick_study)
    assert model.trial_numbers == [study.best_trial.number] and not isinstance(model.net, Ensemble)
    for bad in (0, -1, "2", 1.5, True):  # the project's own error, naming the argument
        with pytest.raises(ConfigError, match="ensemble: expected a whole number >= 1"):
            api.load_best_model(quick_study, ensemble=bad)
    assert api.load_best_model(quick_study, ensemble=np.int64(1)).trial_numbers == [study.best_trial.number]


def test_best_and_the_report_name_the_cycles_the_best_model_averages(quick_study, capsys, tmp_path):
    from cycle_optuna import cli

    study = _run(quick_study, n_trials=5, ensemble=2)
    top = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)[:2]
    assert top[1].value <= top[0].value + api.ENSEMBLE_SPREAD  # both are averaged
    cycles = ", ".join(str(t.number + 1) for t in top)
    capsys.readouterr()
    assert cli.main(["best", str(quick_study)]) == 0
    assert f"mean of cycles {cycles}" in capsys.readouterr().out
    assert cli.main(["report", str(quick_study), "-o", str(tmp_path / "rep")]) == 0
    assert f"averages the class probabilities of cycles {cycles}" in (tmp_path / "rep" / "report.md").read_text()


def test_a_runner_up_far_behind_the_best_is_not_averaged_in(quick_study, capsys):
    """Three cycles of the quick study: the best at 97% validation accuracy, the next two at 75% and
    54% (validation loss 0.16 against 0.92 and 1.08). Averaging the second in pulled every prediction
    toward a model that lost the signal; the best model is the best cycle alone, and says so."""
    from cycle_optuna import cli

    study = _run(quick_study, n_trials=3, ensemble=2)
    done = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert len(done) == 3 and done[1].value > done[0].value + api.ENSEMBLE_SPREAD
    assert "model_artifact_id" in done[1].user_attrs  # it kept its model: left out by its loss, not for want of one
    model = api.load_best_model(quick_study)
    assert model.trial_numbers == [done[0].number] and not isinstance(model.net, Ensemble)
    assert api.best_record(quick_study)["model_cycles"] == [done[0].number + 1]
    capsys.readouterr()
    assert cli.main(["best", str(quick_study)]) == 0
    assert "mean of cycles" not in capsys.readouterr().out


def test_a_full_disk_costs_a_runner_up_its_place_in_the_ensemble_not_its_result(quick_study, monkeypatch, caplog):
    import errno

    from cycle_optuna import objective
    from cycle_optuna import storage as storage_mod

    text = quick_study.read_text().replace("seed = 0", "seed = 0\nensemble = 2", 1)
    quick_study.write_text(text)
    cfg = config.load(quick_study)
    study = optuna.create_study(storage=storage.resolve_url(cfg), study_name="full")
    leader = optuna.trial.create_trial(params={}, distributions={}, value=1e-3)  # far ahead of any real run
    study.add_trial(leader)

    def full(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_mod.shutil, "copyfileobj", full)
    obj = objective.Objective(cfg, load_study_data(cfg), artifact_store=storage.artifact_store(cfg))
    study.enqueue_trial({p.name: getattr(cfg.baseline, p.name) for p in cfg.space})
    study.optimize(obj, n_trials=1)
    runner_up = study.trials[1]
    assert runner_up.state == TrialState.COMPLETE  # second of 2: it would have joined the ensemble
    assert "model_artifact_id" not in runner_up.user_attrs
    assert "No space left on device" in runner_up.user_attrs["model_save_error"]
    assert f"cycle {runner_up.number + 1} (trial {runner_up.number}): model not saved: " in caplog.text
