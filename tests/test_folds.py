"""[data] folds: k-fold cross-validation inside the training file, from the split to the best model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from cycle_optuna import api, baselines, config
from cycle_optuna.config import DataConfig, Hyperparams, TrainConfig
from cycle_optuna.data import cv_folds, load_task, stratified_split
from cycle_optuna.errors import ConfigError, DataError
from cycle_optuna.train import train_and_evaluate

HP = Hyperparams(lr=3e-3, batch_size=16, hidden_dim=16, n_layers=1, n_heads=2, dropout=0.0, weight_decay=0.01)
CFG = TrainConfig(epochs=3, schedule="cosine", warmup_epochs=0.5, early_stopping_patience=0, device="cpu",
                  min_epoch_samples=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def _npz(path, n: int = 60, t: int = 6):
    rng = np.random.default_rng(1)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, t, 2)).astype(np.float32)
    x[:, :, 0] += 1.2 * (y[:, None] - 1)
    np.savez(path, X=x, y=y)
    return path, x, y


# --- the split --------------------------------------------------------------------------------


def test_auto_cross_validates_only_a_small_validation_split(tmp_path):
    path, _, _ = _npz(tmp_path / "a.npz", n=60)  # 9 validation series
    assert load_task(DataConfig(), 0, data_path=path).n_folds == 5
    assert load_task(DataConfig(folds=1), 0, data_path=path).n_folds == 1
    assert load_task(DataConfig(folds=3), 0, data_path=path).n_folds == 3
    edge, _, _ = _npz(tmp_path / "e.npz", n=132)  # 21 validation series: just over what "auto" cross-validates
    assert len(load_task(DataConfig(folds=1), 0, data_path=edge).y_val) == 21
    assert load_task(DataConfig(), 0, data_path=edge).n_folds == 1
    below, _, _ = _npz(tmp_path / "t.npz", n=129)  # 18
    assert load_task(DataConfig(), 0, data_path=below).n_folds == 5
    big, _, _ = _npz(tmp_path / "b.npz", n=240)  # 36 validation series
    assert load_task(DataConfig(), 0, data_path=big).n_folds == 1
    assert load_task(DataConfig(folds=4), 0, data_path=big).n_folds == 4


def test_auto_cross_validates_a_split_of_few_series_per_class(tmp_path):
    """Many classes of a few series each: one validation series per class is a large share of each
    class's training, so "auto" cross-validates although the validation split holds more than 20."""
    def classes(k: int, per: int) -> Path:
        rng = np.random.default_rng(0)
        path = tmp_path / f"{k}x{per}.npz"
        np.savez(path, X=rng.normal(size=(k * per, 8, 1)), y=np.repeat(np.arange(k), per))
        return path

    few = load_task(DataConfig(), 0, data_path=classes(30, 4))  # 30 validation series, one per class
    assert few.n_folds == 5 and len(few.y_val) == 30
    assert load_task(DataConfig(folds=1), 0, data_path=classes(30, 4)).n_folds == 1  # an explicit 1 stays
    from types import SimpleNamespace

    from cycle_optuna.cli import small_validation_note

    note = small_validation_note(SimpleNamespace(data=DataConfig()), few)
    assert '([data] folds = "auto": the validation split alone would hold 30, under 2 per class of its 30)' in note
    enough = load_task(DataConfig(folds=1), 0, data_path=classes(12, 14))  # 2 per class
    assert len(enough.y_val) == 24 and load_task(DataConfig(), 0, data_path=classes(12, 14)).n_folds == 1


def test_the_unscored_class_note_offers_folds_only_where_they_can_run(tmp_path):
    from types import SimpleNamespace

    from cycle_optuna.cli import small_validation_note

    rng = np.random.default_rng(0)
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    np.savez(train, X=rng.normal(size=(3, 8, 1)), y=np.array([0, 1, 1]))  # class 0: one series, it trains
    np.savez(test, X=rng.normal(size=(4, 8, 1)), y=np.array([0, 1, 0, 1]))
    cfg = DataConfig(folds=1, val_fraction=0.4)
    note = small_validation_note(SimpleNamespace(data=cfg), load_task(cfg, 0, data_path=train, test_path=test))
    assert "never scored on them" in note and "folds = 5" not in note and "too few to cross-validate" in note


@pytest.mark.parametrize("where", ["train", "test file"])
def test_a_length_note_when_the_longest_series_sets_the_automatic_patch(tmp_path, where):
    from cycle_optuna.cli import length_note

    rng = np.random.default_rng(0)
    x = np.full((40, 2000, 1), np.nan)
    x[:, :16] = rng.normal(size=(40, 16, 1))
    test = None
    if where == "train":
        x[0] = rng.normal(size=(2000, 1))  # one long series among 16-step ones
    else:  # the training series are short, a test series is long: the padding is the test file's
        test = tmp_path / "test.npz"
        np.savez(test, X=rng.normal(size=(4, 2000, 1)), y=np.arange(4) % 2)
    path = tmp_path / "a.npz"
    np.savez(path, X=x if where == "train" else x[:, :16], y=np.arange(40) % 2)
    data = load_task(DataConfig(folds=1), 0, data_path=path, test_path=test)
    from cycle_optuna import config

    def study(space, patch_len=0):  # a study file's config: [space] as written (None: no [space] table)
        return config.parse({"study": {"name": "x"}, "baseline": {"patch_len": patch_len},
                             **({"space": space} if space is not None else {})})

    note = length_note(study({}), data)
    assert note.startswith("note: the series are padded to 2000 steps, the median training series has 16: the "
                           "automatic patch_len (128) follows the padded length, which makes a series of the median "
                           "length 1 token(s); set [baseline] patch_len (a patch of 1 suits the median series and "
                           "makes the padded length 2000 tokens)"), note
    assert length_note(study({}, patch_len=4), data) is None  # chosen: not auto
    searched = study({"patch_len": {"choices": [0, 8]}})
    assert length_note(searched, data).endswith("; patch_len is searched, but cycle 1 runs the automatic one")
    default = study(None)  # a file without [space]
    assert length_note(default, data).endswith("; patch_len is searched, but cycle 1 runs the automatic one")
    made_so = {"space": {"patch_len": {"choices": [64, 128, 256]}}}  # a study that stored the resolved space
    assert length_note(default, data, made_so).endswith("; patch_len is searched, but cycle 1 runs the automatic one")
    made_before = {"space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}  # before the default searched it
    assert length_note(default, data, made_before).endswith("or trim or drop the longest series")
    np.savez(path, X=x[:, :16], y=np.arange(40) % 2)  # every series 16 steps, no padding: nothing to say
    assert length_note(study({}), load_task(DataConfig(folds=1), 0, data_path=path)) is None


def test_data_that_is_constant_everywhere_gets_a_note(tmp_path):
    from cycle_optuna.cli import constant_note

    path = tmp_path / "a.npz"
    np.savez(path, X=np.full((40, 8, 2), 3.5), y=np.arange(40) % 2)
    note = constant_note(load_task(DataConfig(folds=1), 0, data_path=path))
    assert note.startswith("note: every value of the training and validation series is the same")
    x = np.full((40, 8, 2), 3.5)
    x[3, 2, 1] = 4.0  # one value differs: the model has something to read
    np.savez(path, X=x, y=np.arange(40) % 2)
    assert constant_note(load_task(DataConfig(folds=1), 0, data_path=path)) is None


def test_folds_partition_train_and_val_stratified_and_never_touch_test(tmp_path):
    path, x, y = _npz(tmp_path / "a.npz", n=60)
    d = load_task(DataConfig(), 0, data_path=path)
    views = d.cv_views()
    pool_x, pool_y = d.pooled()
    assert len(views) == 5 and len(pool_y) == len(d.y_train) + len(d.y_val)
    assert sum(len(v.y_val) for v in views) == len(pool_y)  # every pooled series validated exactly once
    seen = torch.cat([v.x_val for v in views])
    assert sorted(map(tuple, seen.reshape(len(seen), -1).tolist())) == \
        sorted(map(tuple, pool_x.reshape(len(pool_x), -1).tolist()))
    per_class = torch.stack([torch.bincount(v.y_val, minlength=3) for v in views])  # [fold, class]
    assert (per_class.max(0).values - per_class.min(0).values).le(1).all()  # stratified: each class dealt evenly
    for v in views:
        assert len(v.y_train) + len(v.y_val) == len(pool_y)
        assert torch.equal(v.x_test, d.x_test)
    # the test split is the one the holdout study holds out: cross-validation does not move it
    _, _, te = stratified_split(path, y, 3, 0.15, 0.15, 0)
    assert len(d.y_test) == len(te)


def test_fold_assignment_depends_only_on_labels_and_seed():
    y = np.arange(40) % 4
    a, b, c = cv_folds(y, 4, 5, 0), cv_folds(y, 4, 5, 0), cv_folds(y, 4, 5, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(a).tolist() == [8] * 5
    for cls in range(4):
        assert np.bincount(a[y == cls], minlength=5).tolist() == [2] * 5


def test_statistics_come_from_train_and_val_but_not_test(tmp_path):
    path, x, y = _npz(tmp_path / "a.npz", n=60)
    d = load_task(DataConfig(), 0, data_path=path)
    _, _, te = stratified_split(path, y, 3, 0.15, 0.15, 0)
    x2 = x.copy()
    x2[te] = 1000.0
    np.savez(tmp_path / "b.npz", X=x2, y=y)
    d2 = load_task(DataConfig(), 0, data_path=tmp_path / "b.npz")
    np.testing.assert_array_equal(d.mean, d2.mean)
    pool_x, _ = d.pooled()
    np.testing.assert_allclose(pool_x.numpy().reshape(-1, 2).mean(0), 0, atol=1e-4)


def test_too_many_folds_for_the_file_is_one_line_naming_the_key(tmp_path):
    path, _, _ = _npz(tmp_path / "a.npz", n=24)  # 21 series outside the test split
    with pytest.raises(DataError, match=r"a\.npz: \[data\] folds = 15 needs at least 30 series .* it has 21"):
        load_task(DataConfig(folds=15), 0, data_path=path)


@pytest.mark.parametrize("bad", [0, 21, -1, 2.5, True, "five"])
def test_bad_folds_values_name_the_key(bad):
    with pytest.raises(ConfigError, match=r"data\.folds: must be an integer from 1 to 20, or 'auto'"):
        config.parse({"data": {"folds": bad}}, where="s.toml")


# --- training ---------------------------------------------------------------------------------


def _curve(report_to: list):
    return lambda m: report_to.append(m)


def test_a_cross_validated_epoch_scores_every_series_by_the_model_that_did_not_train_on_it(tmp_path):
    path, _, _ = _npz(tmp_path / "a.npz", n=60)
    d = load_task(DataConfig(), 0, data_path=path)
    seen: list = []
    res = train_and_evaluate(d, HP, CFG, seed=7, report=_curve(seen))
    # each fold alone, seeded as the cross-validated trial seeds it (no dropout: nothing else is random)
    alone = []
    for j, view in enumerate(d.cv_views()):
        curve: list = []
        train_and_evaluate(view, HP, CFG, seed=7 + j, report=_curve(curve))
        alone.append((len(view.y_val), curve))
    n = sum(k for k, _ in alone)
    for e, m in enumerate(seen):
        assert m.val_loss == pytest.approx(sum(k * c[e].val_loss for k, c in alone) / n, rel=1e-5)
        assert m.val_accuracy == pytest.approx(sum(k * c[e].val_accuracy for k, c in alone) / n, abs=1e-9)
    assert res.best_val_loss == min(m.val_loss for m in seen)
    # the trial's model is its folds' models averaged
    assert len(res.model.nets) == 5


def test_under_balanced_class_weights_the_folds_pool_into_one_balanced_loss(tmp_path):
    """Each series is scored by the fold model that did not train on it, and the cross-validated loss
    is the mean over classes of each class's mean loss over every fold's series, the classes
    weighed by their pooled size (not each fold by its own)."""
    rng = np.random.default_rng(2)
    y = np.array([0] * 40 + [1] * 12 + [2] * 8)
    x = rng.normal(size=(60, 6, 2)).astype(np.float32)
    x[:, :, 0] += 1.2 * (y[:, None] - 1)
    path = tmp_path / "skew.npz"
    np.savez(path, X=x, y=y)
    d = load_task(DataConfig(folds=3), 0, data_path=path)
    cfg = dataclasses.replace(CFG, class_weights="balanced")
    res = train_and_evaluate(d, HP, cfg, seed=7)
    losses, labels = [], []
    with torch.inference_mode():
        for net, view in zip(res.model.nets, d.cv_views()):
            net.eval()
            losses.append(torch.nn.functional.cross_entropy(net(view.x_val).float(), view.y_val, reduction="none"))
            labels.append(view.y_val)
    each, pooled = torch.cat(losses), torch.cat(labels)
    balanced = float(torch.stack([each[pooled == c].mean() for c in pooled.unique()]).mean())
    assert res.best_val_loss == pytest.approx(balanced, rel=1e-5)
    assert res.best_val_loss != pytest.approx(float(each.mean()), rel=1e-3)


def test_a_cross_validated_run_resumes_exactly(tmp_path):
    path, _, _ = _npz(tmp_path / "a.npz", n=60)
    d = load_task(DataConfig(folds=3), 0, data_path=path)
    cfg = dataclasses.replace(CFG, epochs=4, augment_jitter=0.1)
    hp = dataclasses.replace(HP, dropout=0.1)
    full = train_and_evaluate(d, hp, cfg, seed=0)
    states = []

    class Crash(Exception):
        pass

    def save_then_crash(epoch: int, state: dict) -> None:
        states.append(state)
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        train_and_evaluate(d, hp, cfg, seed=0, checkpoint=save_then_crash)
    torch.manual_seed(123)
    resumed = train_and_evaluate(d, hp, cfg, seed=0, resume=states[-1])
    assert [(h.train_loss, h.val_loss) for h in resumed.history] == [(h.train_loss, h.val_loss) for h in full.history]
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)


# --- reference baselines ----------------------------------------------------------------------


def test_baselines_are_cross_validated_like_the_transformer(tmp_path):
    path, _, _ = _npz(tmp_path / "a.npz", n=60)
    d = load_task(DataConfig(), 0, data_path=path)
    got = baselines.compute(d, seed=0)
    views = d.cv_views()
    val = sum(len(v.y_val) * baselines.nearest_neighbour(v)[0] for v in views) / len(d.pooled()[1])
    assert got["1nn"]["val_accuracy"] == pytest.approx(val, abs=1e-6)
    pool_x, pool_y = d.pooled()
    whole = dataclasses.replace(d, x_train=pool_x, y_train=pool_y, x_val=pool_x[:0], y_val=pool_y[:0], fold_ids=None)
    assert got["1nn"]["test_accuracy"] == pytest.approx(baselines.nearest_neighbour(whole)[1], abs=1e-6)
    for key in ("majority", "mlp"):
        assert 0 <= got[key]["val_accuracy"] <= 1 and 0 <= got[key]["test_accuracy"] <= 1


# --- the study, end to end --------------------------------------------------------------------

STUDY = """
[study]
name = "cv"
n_trials = 2
seed = 0

[data]
source = "a.npz"

[train]
epochs = 2
min_epoch_samples = 0
threads = 1

[baseline]
lr = 3e-3
batch_size = 16
hidden_dim = 8
n_layers = 1
n_heads = 2

[space]
lr = { low = 1e-4, high = 1e-2, log = true }

[sampler]
type = "random"
"""


def test_a_cross_validated_study_stores_and_loads_the_folds_model(tmp_path):
    path, _, _ = _npz(tmp_path / "a.npz", n=60)
    (tmp_path / "cv.toml").write_text(STUDY)
    study = api.run_study(tmp_path / "cv.toml")
    done = [t for t in study.trials if t.value is not None]
    assert len(done) == 2
    model = api.load_best_model(study, ensemble=1)
    assert len(model.net.nets) == 5  # the best cycle's five fold models, averaged
    d = load_task(DataConfig(), 0, data_path=path)
    probs = model.predict_proba(d.x_test.numpy() * d.std + d.mean)
    assert probs.shape == (len(d.y_test), 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    score = api.held_out_score(study)
    assert score.n == len(d.y_test) and not math.isnan(score.accuracy)
    stored = study.user_attrs[baselines.BASELINES_ATTR]
    assert stored["1nn"]["val_accuracy"] == pytest.approx(baselines.compute(d, seed=0)["1nn"]["val_accuracy"])
    from cycle_optuna.model import count_params

    assert done[0].user_attrs["n_params"] == count_params(model.net.nets[0])  # one model's size, not five
    from cycle_optuna import report

    text = report.write_report(study, tmp_path / "out", test=False).read_text()
    assert f"Cycles are scored by 5-fold cross-validation over the {len(d.pooled()[1])} train and val sequences" in text


def test_an_imbalance_note_names_the_largest_and_the_smallest_class(tmp_path):
    """Classes of 40 and 10 series: the note says which, and how to weigh them equally."""
    from types import SimpleNamespace

    from cycle_optuna.cli import imbalance_note
    from cycle_optuna.config import TrainConfig

    rng = np.random.default_rng(0)
    path = tmp_path / "a.csv"
    rows = ["sample,label,f0", *(f"s{i},{'ok' if i < 40 else 'fault'},{v:.3f}" for i in range(50)
                                 for v in rng.normal(size=4))]
    path.write_text("\n".join(rows) + "\n")
    test = tmp_path / "test.csv"  # a test file of its own: none is carved from the training file
    test.write_text("sample,label,f0\nt0,ok,1\nt1,fault,2\n")
    data = load_task(DataConfig(folds=1), 0, data_path=path, test_path=test)
    note = imbalance_note(SimpleNamespace(train=TrainConfig()), data)
    assert note == ("note: the classes differ in size (40 training and validation series of 'ok' to 10 of 'fault'): training and the "
                    "cycles' ranking favour the large ones, and `best` gives the balanced accuracy and the lowest "
                    "class recall; [train] class_weights = \"balanced\" weighs every class equally in training and in the ranking")
    assert imbalance_note(SimpleNamespace(train=TrainConfig(class_weights="balanced")), data) is None
    path.write_text("\n".join(rows[:1 + 4 * 40] + [r.replace("fault", "ok") for r in rows[1 + 4 * 40:1 + 4 * 42]]
                              + rows[1 + 4 * 42:]) + "\n")  # 42 to 8: a note; the same classes 4 to 1 below
    assert "(42 training and validation series of 'ok' to 8 of 'fault')" in imbalance_note(SimpleNamespace(train=TrainConfig()),
                                                                   load_task(DataConfig(folds=1), 0, data_path=path, test_path=test))
    path.write_text("\n".join(rows[:1 + 4 * 39] + [r.replace("ok", "fault") for r in rows[1 + 4 * 39:1 + 4 * 40]]
                              + rows[1 + 4 * 40:]) + "\n")  # 39 to 11: less than 4 to 1
    assert imbalance_note(SimpleNamespace(train=TrainConfig()), load_task(DataConfig(folds=1), 0, data_path=path, test_path=test)) is None


def test_a_value_far_outside_the_rest_is_named_as_a_likely_missing_value_code(tmp_path):
    """One 999999 among values near 0 (a missing-value code held as a number) set the scale every
    series was normalised by: cycles and baselines sat at chance, and nothing said why."""
    from cycle_optuna.cli import outlier_note

    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 12, 2))
    labels = ["up" if i % 2 else "down" for i in range(40)]

    def task(v):
        path = tmp_path / "a.csv"
        path.write_text("\n".join(["sample,label,power,temp", *(f"s{i},{labels[i]},{v[i, t, 0]:.6g},{v[i, t, 1]:.6g}"
                                                                for i in range(40) for t in range(12))]) + "\n")
        test = tmp_path / "t.csv"
        test.write_text("sample,label,power,temp\nt0,up,1,2\nt0,up,1,2\nt1,down,2,3\nt1,down,2,3\n")
        return load_task(DataConfig(folds=1), 0, data_path=path, test_path=test)

    assert outlier_note(task(values)) is None  # 960 normal values: the farthest is a few spreads out
    coded = values.copy()
    coded[3, 5, 1] = 999999
    coded[7, 0, 1] = -9999
    note = outlier_note(task(coded))
    assert note.startswith("note: 2 training values of feature 'temp' lie far outside the rest (the farthest about "
                           "999999, where half the values lie between "), note
    assert note.endswith("leave missing values empty (or NaN) in the file")
    common = values.copy()  # a code on 3% of the steps: the 1-99% range held it and said nothing
    common.reshape(-1, 2)[::33, 1] = 999999
    assert "values of feature 'temp' lie far outside the rest (the farthest about 999999" in outlier_note(task(common))
    counts = np.round(np.abs(values) * 2)  # integers 0..7 in the file: the note says them as the file does
    counts[2, 2, 0] = 99999
    assert "(the farthest about 99999, where half the values lie between 1 and 2)" in outlier_note(task(counts))
    # only the series that set the scale count: a validation value does not (the split's own scale is the training one's)
    data = task(values)
    data.x_val[0, 0, 1] = 1e6
    assert outlier_note(data) is None
    data.x_train[0, 0, 1] = 1e6
    assert "1 training value of feature 'temp' lies far outside the rest" in outlier_note(data)
    events = np.zeros_like(values)  # a feature that is mostly 0 with a rare event: its middle 98% is 0 wide
    events[5, 3, 0] = 50
    assert outlier_note(task(np.concatenate([events[..., :1], values[..., 1:]], axis=2))) is None
