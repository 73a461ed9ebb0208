"""Reference baselines: what each computes, stored once per study, read by the diagnosis and `best`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from cycle_optuna import baselines, cli, objective, worker
from cycle_optuna.config import load
from cycle_optuna.data import TaskData, load_study_data
from cycle_optuna.features import z_normalise
from cycle_optuna.train import EpochMetrics, TrainResult

TINY = """[study]
name = "tiny"
n_trials = 1
seed = 0

[data]
source = "train.npz"
{test_line}
val_fraction = 0.2
test_fraction = 0.2
folds = 1

[train]
epochs = 1
threads = 1

[baseline]
lr = 3e-3
batch_size = 16
hidden_dim = 8
n_layers = 1
n_heads = 2
dropout = 0.0

[space]
lr = {{ low = 1e-3, high = 1e-2, log = true }}

[sampler]
type = "tpe"
"""


def _toy(n: int, *, t: int = 6, f: int = 2, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class c is a level shift of c on every feature, plus noise: easy for 1-NN and the MLP."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    return (rng.normal(size=(n, t, f)) * 0.3 + y[:, None, None]).astype(np.float32), y


def _study_file(tmp_path: Path, *, test: bool = False, x=None, y=None, test_xy=None) -> Path:
    if x is None:
        x, y = _toy(60)
    np.savez(tmp_path / "train.npz", X=x, y=y)
    if test:
        tx, ty = test_xy if test_xy is not None else _toy(30, seed=1)
        np.savez(tmp_path / "test.npz", X=tx, y=ty)
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(test_line='test_source = "test.npz"' if test else ""))
    return path


def _task(x_train, y_train, x_val, y_val, x_test, y_test, k) -> TaskData:
    t = torch.as_tensor
    return TaskData(t(x_train), t(y_train), t(x_val), t(y_val), t(x_test), t(y_test),
                    mean=np.zeros(x_train.shape[2], np.float32), std=np.ones(x_train.shape[2], np.float32), n_classes=k)


# --- the baselines themselves ------------------------------------------------------------------------


def test_majority_class_answers_the_most_frequent_training_class():
    z = np.zeros((1, 3, 1), np.float32)
    d = _task(np.repeat(z, 5, 0), np.array([0, 1, 1, 1, 2]), np.repeat(z, 4, 0), np.array([1, 1, 0, 2]),
              np.repeat(z, 2, 0), np.array([0, 0]), 3)
    assert baselines.majority_class(d) == (0.5, 0.0)


def test_each_baseline_stores_its_balanced_test_accuracy():
    """On imbalanced test classes accuracy flatters "always the majority": 80% of a 4-to-1 test split
    is a balanced accuracy of 50% (the mean of its recalls, 1 and 0)."""
    z = np.zeros((1, 3, 1), np.float32)
    d = _task(np.repeat(z, 6, 0), np.array([0, 0, 0, 0, 1, 1]), np.repeat(z, 2, 0), np.array([0, 1]),
              np.repeat(z, 5, 0), np.array([0, 0, 0, 0, 1]), 2)
    stored = baselines.compute(d, seed=0)
    assert stored["majority"]["test_accuracy"] == 0.8 and stored["majority"]["test_balanced_accuracy"] == 0.5
    assert all(v["test_balanced_accuracy"] is not None for v in stored.values())


def test_nearest_neighbour_is_euclidean_and_treats_missing_steps_as_zero():
    ref = np.array([[[0.0], [0.0]], [[3.0], [3.0]], [[0.0], [10.0]]], np.float32)
    # query 0 is nearest to ref 1 by Euclidean distance; query 1 has a missing step (NaN -> 0): nearest ref 0
    q = np.array([[[2.0], [2.0]], [[np.nan], [1.0]]], np.float32)
    d = _task(ref, np.array([0, 1, 2]), q, np.array([1, 0]), q, np.array([1, 2]), 3)
    assert baselines.nearest_neighbour(d) == (1.0, 0.5)


def test_z_normalised_nearest_neighbour_compares_shapes_whatever_each_series_offset_and_gain():
    """Raw recordings: each series at its own level and gain. 1-NN on the normalised series follows
    the offsets; z-normalising each series on its own compares the shapes, as the UCR archive does."""
    rng = np.random.default_rng(0)
    n, t = 90, 40
    y = np.arange(n) % 3
    s = np.linspace(0, 1, t)
    shapes = np.stack([np.sin(2 * np.pi * s), np.sign(np.sin(4 * np.pi * s)), 2 * s - 1])  # [3, T]
    clean = shapes[y][:, :, None] + rng.normal(0, 0.1, (n, t, 1))
    raw = clean * rng.uniform(0.3, 3.0, (n, 1, 1)) + rng.normal(0, 20.0, (n, 1, 1))
    raw[5, 10:14, 0] = np.nan  # a missing stretch: the statistics use the present steps
    raw[7, :, 0] = 4.0  # a constant series: zeros after z-normalising, never NaN
    parts = lambda x: (x[:60], y[:60], x[60:75], y[60:75], x[75:], y[75:])  # noqa: E731
    d = _task(*(a.astype(np.float32) if a.dtype.kind == "f" else a for a in parts(raw)), 3)
    z = z_normalise(d.x_train.double())
    present = ~torch.isnan(z[5])
    assert float(z[5][present].mean()) == pytest.approx(0, abs=1e-9)
    assert float(z[5][present].std(unbiased=False)) == pytest.approx(1, abs=1e-9)
    assert torch.equal(z[7], torch.zeros_like(z[7])) and torch.isnan(z[5, 10:14]).all()
    assert baselines.nearest_neighbour(d, per_series=True) == (1.0, 1.0)
    assert max(baselines.nearest_neighbour(d)) < 0.7  # the offsets decide the plain 1-NN's neighbours
    stored = baselines.compute(d, seed=0)
    assert stored["1nn_z"] == {"label": "1-NN Euclidean on z-normalised series", "val_accuracy": 1.0,
                               "test_accuracy": 1.0, "test_balanced_accuracy": 1.0}
    assert baselines.best_reference(stored)[0] == "1nn_z"


def test_summary_features_are_finite_with_padding_and_missing_values():
    x, _ = _toy(20, t=12, f=3)
    x[::2, 7:] = np.nan  # padded shorter series
    x[1, 3, 1] = np.nan
    feats = baselines.summary_features(torch.as_tensor(x))
    assert feats.shape[0] == 20 and torch.isfinite(feats).all()
    # padding changes the features of the padded series only
    full = baselines.summary_features(torch.as_tensor(_toy(20, t=12, f=3)[0]))
    assert not torch.allclose(feats[0], full[0]) and torch.allclose(feats[3], full[3])


def test_compute_is_deterministic_and_beats_chance_on_an_easy_task():
    x, y = _toy(150)
    idx = np.arange(150)
    tr, va, te = idx[:90], idx[90:120], idx[120:]
    t = _task(x[tr], y[tr], x[va], y[va], x[te], y[te], 3)
    a, b = baselines.compute(t, seed=0), baselines.compute(t, seed=0)
    assert a == b
    assert set(a) == {"majority", "1nn", "1nn_z", "mlp"}
    assert json.loads(json.dumps(a)) == a
    for key in ("1nn", "mlp"):
        assert a[key]["val_accuracy"] > 0.9 and a[key]["test_accuracy"] > 0.9, a
    assert a["majority"]["label"] == "majority class" and abs(a["majority"]["val_accuracy"] - 1 / 3) < 0.01


def test_compare_says_beats_or_below_with_the_margin_on_val_and_test():
    stored = {"majority": {"label": "majority class", "val_accuracy": 0.5, "test_accuracy": 0.4},
              "1nn": {"label": "1-NN Euclidean", "val_accuracy": 0.9, "test_accuracy": None}}
    rows = baselines.compare(stored, val_accuracy=0.8, test_accuracy=0.7)
    assert rows[0]["val_margin"] == 30.0 and rows[0]["test_margin"] == 30.0
    assert "beats it on val (80.0% vs 50.0%, +30.0 points)" in rows[0]["line"]
    assert rows[1]["val_margin"] == -10.0 and rows[1]["test_margin"] is None
    assert rows[1]["line"] == "1-NN Euclidean: below it on val (80.0% vs 90.0%, -10.0 points)"
    named = baselines.compare({"mlp": {"label": "MLP", "val_accuracy": 0.5, "test_accuracy": 0.5}}, val_accuracy=0.8,
                    test_accuracy=0.6, val_model="cycle 4", test_model="mean of cycles 4, 2")
    assert named[0]["line"] == ("MLP: beats it on val (cycle 4: 80.0% vs 50.0%, +30.0 points); "
                                "beats it on test (mean of cycles 4, 2: 60.0% vs 50.0%, +10.0 points)")
    assert baselines.best_reference(stored)[0] == "1nn"
    tie = baselines.compare({"mlp": {"label": "MLP", "val_accuracy": 0.9283, "test_accuracy": 0.9107}},
                            val_accuracy=0.92826, test_accuracy=0.9111)
    assert tie[0]["line"] == "MLP: ties it on val (92.8% vs 92.8%, +0.0 points); ties it on test (91.1% vs 91.1%, +0.0 points)"
    assert baselines.best_reference(None) is None


def test_compare_on_imbalanced_test_classes_also_says_balanced_accuracy():
    stored = {"majority": {"label": "majority class", "val_accuracy": 0.8, "test_accuracy": 0.8,
                           "test_balanced_accuracy": 0.333333},
              "old": {"label": "stored by an older release", "val_accuracy": 0.5, "test_accuracy": 0.5}}
    rows = baselines.compare(stored, val_accuracy=0.9, test_accuracy=0.902, test_balanced_accuracy=0.66)
    assert rows[0]["line"] == ("majority class: beats it on val (90.0% vs 80.0%, +10.0 points); beats it on test "
                               "(90.2% vs 80.0%, +10.2 points; balanced accuracy 66.0% vs 33.3%, +32.7 points: beats it)")
    assert rows[0]["test_balanced_margin"] == 32.67 and "balanced" not in rows[1]["line"]
    even = baselines.compare(stored, val_accuracy=0.9, test_accuracy=0.902)  # equal classes: accuracy says it all
    assert "balanced" not in even[0]["line"]


def test_compare_rounds_the_margin_once_and_never_stores_minus_zero():
    import math

    # 87.843 vs 85.098: 2.745 points is +2.7 (it was rounded to 2.75 first, then printed +2.8)
    rows = baselines.compare({"mlp": {"label": "MLP", "val_accuracy": 0.85098, "test_accuracy": 0.9}},
                             val_accuracy=0.87843, test_accuracy=0.9 - 1e-9)
    assert "+2.7 points" in rows[0]["line"]
    assert rows[0]["test_margin"] == 0.0 and math.copysign(1.0, rows[0]["test_margin"]) == 1.0  # not -0.0 in --json
    assert "ties it on test" in rows[0]["line"]


# --- honest diagnosis ----------------------------------------------------------------------------------


def _result(vals, trains, acc):
    hist = [EpochMetrics(epoch=i, train_loss=t, val_loss=v, val_accuracy=acc, lr=1e-3, nan_batches=0, seconds=0.1)
            for i, (v, t) in enumerate(zip(vals, trains))]
    best = min(vals)
    return TrainResult(best_val_loss=best, best_val_accuracy=acc, best_epoch=vals.index(best),
                       final_train_loss=trains[vals.index(best)], epochs_run=len(vals), history=hist,
                       diverged=False, stopped_early=False, nan_batches=0, train_seconds=1.0,
                       samples_per_second=1.0, model=None)


@pytest.mark.parametrize(("vals", "trains", "acc", "reference", "expected"), [
    # a plateau well above chance, but below the reference: not converged
    ([0.9, 0.7, 0.6, 0.6, 0.6], [0.9, 0.7, 0.6, 0.6, 0.6], 0.70, 0.88, "underfit"),  # train no better than val
    ([0.9, 0.7, 0.6, 0.6, 0.6], [0.8, 0.5, 0.4, 0.4, 0.4], 0.70, 0.88, "below_baseline"),  # fits train, not val
    ([0.9, 0.8, 0.7, 0.6], [0.8, 0.6, 0.5, 0.4], 0.70, 0.88, "below_baseline"),  # still improving: not converging
    ([0.9, 0.7, 0.6, 0.6, 0.6], [0.9, 0.7, 0.6, 0.6, 0.6], 0.90, 0.88, "converged"),  # above the reference
    ([0.9, 0.7, 0.6, 0.6, 0.6], [0.9, 0.7, 0.6, 0.6, 0.6], 40 / 45, 0.888889, "converged"),  # a tie, stored rounded
    ([0.9, 0.7, 0.6, 0.6, 0.6], [0.9, 0.7, 0.6, 0.6, 0.6], 0.70, None, "converged"),  # no reference stored
    ([0.9, 0.7, 0.6, 0.65, 0.7], [0.9, 0.6, 0.4, 0.3, 0.2], 0.70, 0.88, "overfit"),  # the curves say why
])
def test_diagnosis_is_judged_against_the_reference(vals, trains, acc, reference, expected):
    assert objective.diagnose(_result(vals, trains, acc), n_classes=3, reference=reference) == expected
    assert expected in objective.DIAGNOSES


# --- stored once per study --------------------------------------------------------------------------------


def test_baselines_are_computed_at_creation_before_any_trial_and_never_again(tmp_path):
    path = _study_file(tmp_path)
    cfg, url = load(path), f"sqlite:///{tmp_path / 'tiny.db'}"
    data = load_study_data(cfg)
    study = worker.open_study(cfg, url, data=data)
    stored = study.user_attrs[baselines.BASELINES_ATTR]
    assert all(t.state == optuna.trial.TrialState.WAITING for t in study.trials)  # no trial has run yet
    assert stored == baselines.compute(data, seed=0)
    assert set(stored) == {"majority", "1nn", "1nn_z", "mlp"}
    assert all(set(v) == {"label", "val_accuracy", "test_accuracy", "test_balanced_accuracy"} for v in stored.values())
    # a second worker (and a later run) reads them: mark the stored value, it must survive
    marked = {**stored, "majority": {**stored["majority"], "label": "as stored"}}
    study.set_user_attr(baselines.BASELINES_ATTR, marked)
    worker.run_worker(cfg, url)
    again = optuna.load_study(study_name="tiny", storage=url)
    assert again.user_attrs[baselines.BASELINES_ATTR] == marked
    assert len(again.trials) == 1


def test_long_baselines_are_said_before_and_timed_after(tmp_path, caplog, monkeypatch):
    """On a large data set the 1-NNs take minutes after the banner: the worker says what it is doing."""
    path = _study_file(tmp_path)
    cfg, url = load(path), f"sqlite:///{tmp_path / 'tiny.db'}"
    data = load_study_data(cfg)
    queries, refs, values = baselines.nn_work(data)
    assert refs == len(data.y_train) + (len(data.y_val) if data.n_folds > 1 else 0) and values == data.x_train[0].numel()
    monkeypatch.setattr(worker, "SLOW_BASELINES", 2 * queries * refs * values - 1)  # this data set counts as large
    with caplog.at_level("WARNING", logger=worker.__name__):
        worker.open_study(cfg, url, data=data)
    said = [r.getMessage() for r in caplog.records if r.name == worker.__name__]
    assert said[0] == (f"scoring the reference baselines once for the study: each 1-NN compares {queries} series "
                       f"with {refs} of {values} values; this can take minutes")
    assert said[1].startswith("reference baselines scored in ")
    caplog.clear()
    monkeypatch.setattr(worker, "SLOW_BASELINES", 2 * queries * refs * values)  # at the threshold: quiet
    worker.open_study(cfg, f"sqlite:///{tmp_path / 'other.db'}", data=data)
    assert not [r for r in caplog.records if r.name == worker.__name__]


def test_a_study_below_its_reference_is_never_converged(tmp_path):
    path = _study_file(tmp_path)
    cfg, url = load(path), f"sqlite:///{tmp_path / 'tiny.db'}"
    study = worker.open_study(cfg, url, data=load_study_data(cfg))
    # an unbeatable reference (stored as a study would hold it): every trial is judged against it
    study.set_user_attr(baselines.BASELINES_ATTR, {"oracle": {"label": "oracle", "val_accuracy": 1.01,
                                                              "test_accuracy": 1.0}})
    worker.run_worker(cfg, url)
    t = optuna.load_study(study_name="tiny", storage=url).trials[0]
    assert t.user_attrs["diagnosis"] in ("underfit", "below_baseline", "overfit", "unstable")


def test_best_prints_one_line_per_baseline_and_json_has_the_margins(tmp_path, capsys):
    path = _study_file(tmp_path, test=True)
    assert cli.main(["run", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["best", str(path), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert [b["baseline"] for b in rec["baselines"]] == ["majority", "1nn", "1nn_z", "mlp"]
    for b in rec["baselines"]:
        assert b["val_margin"] == pytest.approx(100 * (rec["user_attrs"]["val_accuracy"] - b["val_accuracy"]), abs=0.01)
        assert b["test_margin"] == pytest.approx(100 * (rec["test_accuracy"] - b["test_accuracy"]), abs=0.01)
    assert rec["n_test"] == 30  # the official test file, whole
    assert cli.main(["best", str(path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("vs ")]
    assert len(lines) == 4 and lines[1].startswith("vs 1-NN Euclidean: ") and " on test (" in lines[1]
    assert lines[2].startswith("vs 1-NN Euclidean on z-normalised series: ")
    # each figure names its model: val is the best cycle's, test the model `best` loads
    members = rec["model_cycles"]
    test_model = f"mean of cycles {', '.join(map(str, members))}" if len(members) > 1 else f"cycle {members[0]}"
    assert f" on val (cycle {rec['cycle']}: " in lines[1] and f" on test ({test_model}: " in lines[1]



def test_a_study_without_stored_baselines_says_so_and_best_computes_nothing(tmp_path):
    from cycle_optuna import api

    url = f"sqlite:///{tmp_path / 'old.db'}"
    study = optuna.create_study(study_name="old", storage=url)
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"val_accuracy": 0.8}))
    rec = api.best_record("old", storage=url, with_test=False)
    assert rec["baselines"] == [] and "next worker on this study computes them" in rec["baselines_note"]
    assert api.reference_baselines("old", storage=url) is None
    assert baselines.BASELINES_ATTR not in optuna.load_study(study_name="old", storage=url).user_attrs


def test_raw_input_with_missing_values_is_filled_like_training():
    from cycle_optuna.data import fill_partial

    x = np.array([[[np.nan, 1.0], [np.nan, np.nan], [2.0, 3.0]]], np.float32)
    a, b = fill_partial(x), fill_partial(torch.as_tensor(x)).numpy()
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    assert a[0, 0, 0] == 0 and np.isnan(a[0, 1]).all() and a[0, 2, 0] == 2

# --- bad data through the command line: one line, exit 2, nothing written ------------------------------


def _bad_ts(tmp_path: Path, edit) -> None:
    text = ("@problemName t\n@univariate false\n@dimensions 2\n@equalLength true\n@seriesLength 3\n"
            "@classLabel true a b\n@data\n" + "1,2,3:4,5,6:a\n3,2,1:6,5,4:b\n" * 10)
    (tmp_path / "train.ts").write_text(edit(text))


@pytest.mark.parametrize(("setup", "needle"), [
    (lambda p: _study_file(p, test=True, test_xy=(_toy(30, f=3)[0], _toy(30)[1])),
     "test.npz: 3 feature(s) per step, but the training file"),
    (lambda p: _study_file(p, test=True, test_xy=(_toy(30)[0], _toy(30)[1] + 3)),
     "test.npz: class set differs from the training file's"),
    (lambda p: (_bad_ts(p, lambda t: t.replace("@equalLength", "@equalLenght")), _ts_study(p))[1],
     "train.ts: line 4: unknown header '@equalLenght'"),
    (lambda p: (_bad_ts(p, lambda t: t.replace("1,2,3:4,5,6:a", "1,2,3:4,5:a", 1)), _ts_study(p))[1],
     "train.ts: line 8: ragged dimensions: dimension 1 has 3 values, dimension 2 has 2"),
    (lambda p: (_bad_ts(p, lambda t: t.replace("1,2,3:4,5,6:a", "1,2,3:a", 1)), _ts_study(p))[1],
     "train.ts: line 8: ragged dimensions: 1 dimension(s), expected 2"),
    (lambda p: _lengths_study(p), "train.npz: lengths[5] = 9 is out of range 1..6"),
])
def test_bad_data_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, setup, needle):
    path = setup(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["run", str(path)], ["run", str(path), "--workers", "2"], ["worker", str(path)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .db, no artifacts, no logs


def _ts_study(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(test_line="").replace('"train.npz"', '"train.ts"'))
    return path


def _lengths_study(tmp_path: Path) -> Path:
    path = _study_file(tmp_path)
    x, y = _toy(60)
    lengths = np.full(60, 6)
    lengths[5] = 9
    np.savez(tmp_path / "train.npz", X=x, y=y, lengths=lengths)
    return path

