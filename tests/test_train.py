"""The training loop, run for real on shrunk configs (each test a second or two on one CPU core)."""

from __future__ import annotations

import dataclasses
import math
import statistics

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import OneCycleLR

from cycle_optuna.config import DataConfig, Hyperparams, TrainConfig
from cycle_optuna.data import load_task
from cycle_optuna.errors import ConfigError
from cycle_optuna.train import (EpochMetrics, build_model, evaluate, lr_at, lr_factor, resolve_device,
                                train_and_evaluate)

HP = Hyperparams(lr=3e-3, batch_size=16, hidden_dim=16, n_layers=1, n_heads=2, dropout=0.1, weight_decay=0.01)
# plain cross-entropy: the loss-level effects below (memorising, a too-high lr) are measured on it
CFG = TrainConfig(epochs=6, schedule="constant", warmup_epochs=0, early_stopping_patience=0, device="cpu",
                  min_epoch_samples=0, label_smoothing=0.0)  # one pass per epoch: counts below are per pass


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    """A linearly separable task (class shifts feature 0), loaded through the real .npz path."""
    rng = np.random.default_rng(0)
    y = np.arange(150) % 3
    x = rng.normal(size=(150, 6, 3)).astype(np.float32)
    x[:, :, 0] += 1.5 * (y[:, None] - 1)
    path = tmp_path_factory.mktemp("easy") / "easy.npz"
    np.savez(path, X=x, y=y)
    return load_task(DataConfig(folds=1), 0, data_path=path)


@pytest.fixture(scope="module")
def hard():
    """150 samples of the default synthetic task: a big model memorises them, a tiny one cannot."""
    return load_task(DataConfig(n_samples=150, seq_len=16, n_features=8, folds=1), 0)


def _run(data, hp=HP, cfg=CFG, seed=0, **kw):
    return train_and_evaluate(data, hp, cfg, seed=seed, **kw)


def _curve(result):
    return [(m.epoch, m.train_loss, m.val_loss, m.val_accuracy, m.lr, m.nan_batches) for m in result.history]


def _with_x_train(data, x):
    return dataclasses.replace(data, x_train=x)


def test_learns_easy_task(easy):
    r = _run(easy, cfg=dataclasses.replace(CFG, epochs=10))
    assert r.history[-1].train_loss < r.history[0].train_loss - 0.3
    assert r.best_val_accuracy > 0.8  # chance is 1/3
    assert not r.diverged and r.nan_batches == 0 and r.epochs_run == 10
    assert r.samples_per_second > 0 and r.train_seconds > 0
    assert r.final_train_loss == r.history[r.best_epoch].train_loss


def test_same_seed_same_history(easy):
    a, b, c = _run(easy), _run(easy), _run(easy, seed=1)
    assert _curve(a) == _curve(b)
    assert _curve(a) != _curve(c)


def test_nan_inputs_skip_batches_and_training_continues(easy):
    x = easy.x_train.clone()
    x[[3, 40, 77], 2, 1] = float("inf")  # NaN marks missing data (masked); inf poisons the batch
    r = _run(_with_x_train(easy, x))
    assert not r.diverged
    assert all(1 <= m.nan_batches <= 3 for m in r.history)  # the three poisoned samples' batches
    assert r.nan_batches == sum(m.nan_batches for m in r.history)
    assert all(math.isfinite(m.train_loss) and math.isfinite(m.val_loss) for m in r.history)
    assert r.best_val_accuracy > 0.6
    assert all(torch.isfinite(p).all() for p in r.model.parameters())


def test_all_nan_inputs_diverge_without_raising(easy):
    reports = []
    x = torch.full_like(easy.x_train, float("inf"))
    r = _run(_with_x_train(easy, x), cfg=dataclasses.replace(CFG, max_bad_batches=3), report=reports.append)
    assert r.diverged and not r.stopped_early
    assert r.best_val_loss == math.inf and r.best_epoch == -1
    assert r.nan_batches == 3 and r.epochs_run == 1 and reports == []


def test_huge_lr_diverges_without_raising(easy):
    r = _run(easy, dataclasses.replace(HP, lr=1e12), dataclasses.replace(CFG, optimizer="sgd", grad_clip=0.0))
    assert r.diverged
    assert r.epochs_run < CFG.epochs


def _param_change(data, result, cfg, hp=HP, seed=0):
    torch.manual_seed(seed)
    init = build_model(data, hp, cfg)
    return sum((p - q).abs().sum().item() for p, q in zip(result.model.parameters(), init.parameters()))


def test_grad_clip_bounds_each_step(easy):
    cfg = dataclasses.replace(CFG, epochs=1, optimizer="sgd", momentum=0.0)
    hp = dataclasses.replace(HP, lr=0.1, weight_decay=0.0)
    tiny, off = dataclasses.replace(cfg, grad_clip=1e-6), dataclasses.replace(cfg, grad_clip=0.0)
    steps = math.ceil(len(easy.y_train) / hp.batch_size)
    n_params = sum(p.numel() for p in build_model(easy, hp, cfg).parameters())
    clipped = _param_change(easy, _run(easy, hp, tiny), tiny, hp)
    free = _param_change(easy, _run(easy, hp, off), off, hp)
    # L1 change per step <= sqrt(n) * L2 change <= sqrt(n) * lr * clip.
    assert clipped <= steps * math.sqrt(n_params) * 0.1 * 1e-6
    assert free > 1000 * clipped


def test_early_stopping_stops_and_restores_best(easy):
    # min_delta so large that nothing after the first epoch counts: stops after exactly `patience` more.
    cfg = dataclasses.replace(CFG, epochs=20, early_stopping_patience=3, min_delta=10.0)
    r = _run(easy, cfg=cfg)
    assert r.stopped_early and r.epochs_run == 4
    losses = [m.val_loss for m in r.history]
    assert r.best_val_loss == min(losses) and r.best_epoch == losses.index(min(losses))
    loss, acc = evaluate(r.model, easy.x_val, easy.y_val, 64)
    assert loss == pytest.approx(r.best_val_loss, abs=1e-6)
    assert acc == pytest.approx(r.best_val_accuracy)


def test_early_stopping_restores_best_when_val_gets_worse(hard):
    hp = dataclasses.replace(HP, lr=1e-2, hidden_dim=32, dropout=0.0)
    r = _run(hard, hp, dataclasses.replace(CFG, epochs=40, early_stopping_patience=4))
    assert r.stopped_early and r.best_epoch < r.epochs_run - 1
    assert r.history[-1].val_loss > r.best_val_loss
    assert evaluate(r.model, hard.x_val, hard.y_val, 7)[0] == pytest.approx(r.best_val_loss, abs=1e-6)


def test_augmentation_changes_training_but_not_validation(easy):
    cfg = dataclasses.replace(CFG, epochs=2, augment_jitter=3.0, augment_scale=0.5)
    x_before = easy.x_train.clone()
    aug, plain = _run(easy, cfg=cfg), _run(easy)
    assert aug.history[0].train_loss != plain.history[0].train_loss
    assert torch.equal(easy.x_train, x_before)
    # The recorded val loss is the clean val loss of the restored best weights.
    assert evaluate(aug.model, easy.x_val, easy.y_val, 64)[0] == pytest.approx(aug.best_val_loss, abs=1e-6)


def _summary_calls(data, cfg, monkeypatch) -> int:
    """How many times training computed summary statistics (the real function, counted)."""
    from cycle_optuna import model

    calls = []
    real = model.summary_features_of
    monkeypatch.setattr(model, "summary_features_of", lambda x: calls.append(len(x)) or real(x))
    _run(data, hp=dataclasses.replace(HP, summary_features=True), cfg=cfg)
    return len(calls)


def test_summary_statistics_are_computed_once_per_trial_unless_augmented(easy, monkeypatch):
    one, three = (_summary_calls(easy, dataclasses.replace(CFG, epochs=e), monkeypatch) for e in (1, 3))
    # the data set's statistics once per trial (train and validation, plus the model's size probe),
    # not once per step: more epochs, same count
    assert one == three <= 4
    augmented = _summary_calls(easy, dataclasses.replace(CFG, epochs=1, augment_scale=0.2), monkeypatch)
    steps = math.ceil(len(easy.x_train) / HP.batch_size)
    assert augmented >= steps  # an augmented batch is a new series: its statistics are its own


def test_summary_statistics_computed_once_train_as_recomputed_per_step(easy, monkeypatch):
    from cycle_optuna import train

    hp, cfg = dataclasses.replace(HP, summary_features=True), dataclasses.replace(CFG, epochs=2)
    once = _run(easy, hp=hp, cfg=cfg)
    monkeypatch.setattr(train, "summaries", lambda model, x: None)  # the forward pass computes them per batch
    per_step = _run(easy, hp=hp, cfg=cfg)
    for a, b in zip(_curve(once), _curve(per_step), strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


# --- schedules ----------------------------------------------------------------------------------


def _factors(schedule, steps_per_epoch=10, epochs=4, **kw):
    cfg = TrainConfig(schedule=schedule, **kw)
    return [lr_factor(s, steps_per_epoch=steps_per_epoch, epochs=epochs, cfg=cfg) for s in range(steps_per_epoch * epochs)]


def test_linear_warmup_then_constant():
    f = _factors("constant", warmup_epochs=0.5)
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert set(f[5:]) == {1.0}
    assert _factors("constant", warmup_epochs=0)[0] == 1.0


def test_cosine_decays_to_about_zero():
    f = _factors("cosine", warmup_epochs=1)
    assert f[9] == 1.0 and f[10] == 1.0
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[25] == pytest.approx(0.5)
    assert 0 < f[-1] < 0.01


def test_cyclical_is_a_triangle_between_low_and_peak():
    f = _factors("cyclical", warmup_epochs=0, cyclical_low_ratio=0.1, cyclical_period_epochs=2.0)
    assert f[0] == 1.0 and f[10] == pytest.approx(0.1) and f[20] == 1.0 and f[30] == pytest.approx(0.1)
    assert f[5] == pytest.approx(0.55)
    assert min(f) == pytest.approx(0.1) and max(f) == 1.0


def test_onecycle_matches_torch():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = OneCycleLR(opt, max_lr=0.1, total_steps=40, cycle_momentum=False)
    expected = []
    for _ in range(40):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [lr_at(s, base_lr=0.1, steps_per_epoch=10, epochs=4, cfg=TrainConfig(schedule="onecycle")) for s in range(40)]
    assert got == pytest.approx(expected, rel=1e-6)


def test_epoch_metrics_lr_follows_the_schedule(easy):
    cfg = dataclasses.replace(CFG, epochs=3, schedule="cosine", warmup_epochs=0.5)
    r = _run(easy, cfg=cfg)
    spe = math.ceil(len(easy.y_train) / HP.batch_size)
    expected = [lr_at((e + 1) * spe - 1, base_lr=HP.lr, steps_per_epoch=spe, epochs=3, cfg=cfg) for e in range(3)]
    assert [m.lr for m in r.history] == pytest.approx(expected)


# --- optimizers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("optimizer", "lr"), [("adamw", 3e-3), ("adam", 3e-3), ("sgd", 0.05), ("lion", 1e-3),
                                               ("sophia", 3e-3)])
def test_each_optimizer_reduces_loss(easy, optimizer, lr):
    cfg = dataclasses.replace(CFG, epochs=3, optimizer=optimizer)
    r = _run(easy, dataclasses.replace(HP, lr=lr), cfg)
    assert not r.diverged
    assert r.best_val_loss < math.log(3) - 0.1  # the reduced-gain init starts at ~ln 3


# --- hooks, checkpoints, resume -----------------------------------------------------------------


def test_report_sees_every_epoch_and_its_exceptions_propagate(easy):
    class Stop(Exception):
        pass

    seen: list[EpochMetrics] = []

    def report(m: EpochMetrics) -> None:
        seen.append(m)
        if m.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        _run(easy, report=report)
    assert [m.epoch for m in seen] == [0, 1]
    assert math.isfinite(seen[0].val_loss) and 0 <= seen[0].val_accuracy <= 1


@pytest.mark.parametrize("optimizer", ["adamw", "sophia"])
def test_resume_equals_uninterrupted(easy, tmp_path, optimizer):
    cfg = dataclasses.replace(CFG, epochs=4, schedule="cosine", warmup_epochs=0.5, augment_jitter=0.1,
                              optimizer=optimizer)
    full = _run(easy, cfg=cfg)

    class Crash(Exception):
        pass

    path = tmp_path / "ckpt.pt"

    def save_then_crash(epoch: int, state: dict) -> None:
        torch.save(state, path)
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        _run(easy, cfg=cfg, checkpoint=save_then_crash)
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1
    torch.manual_seed(123)  # whatever the caller did in between must not matter
    resumed = _run(easy, cfg=cfg, resume=state)
    assert [c[:5] for c in _curve(resumed)] == [c[:5] for c in _curve(full)]
    assert (resumed.best_val_loss, resumed.best_epoch) == (full.best_val_loss, full.best_epoch)
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)


def test_resume_of_a_finished_run_trains_no_more(easy):
    states = []
    cfg = dataclasses.replace(CFG, epochs=20, early_stopping_patience=2, min_delta=10.0)
    first = _run(easy, cfg=cfg, checkpoint=lambda e, s: states.append(s))
    again = _run(easy, cfg=cfg, resume=states[-1])
    assert first.stopped_early and again.stopped_early
    assert _curve(again) == _curve(first)


# --- devices and options ------------------------------------------------------------------------


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            resolve_device("cuda")


def test_compile_failure_falls_back_to_eager(easy, monkeypatch):
    def broken(model, *a, **kw):
        def fail(*a, **kw):
            raise RuntimeError("no compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        r = _run(easy, cfg=dataclasses.replace(CFG, epochs=2, compile=True))
    assert _curve(r) == _curve(_run(easy, cfg=dataclasses.replace(CFG, epochs=2)))


def test_threads_option_sets_torch_threads(easy):
    before = torch.get_num_threads()
    try:
        _run(easy, cfg=dataclasses.replace(CFG, epochs=1, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- hyperparameters matter (the same effects docs/task.md measures on the default task) ---------


def test_too_high_lr_is_clearly_worse(easy):
    # Training at a too-high lr is chaotic: one seed can land well by luck (and where it lands
    # depends on the CPU's float kernels), so compare medians over three seeds. The pre-LN blocks,
    # the stem and gradient clipping survive lr 1.0 on this easy task; lr 10 they do not.
    cfg = dataclasses.replace(CFG, epochs=4, min_epoch_samples=512)  # 5 passes of 105 rows an epoch
    good = [_run(easy, cfg=cfg, seed=s) for s in range(3)]
    bad = [_run(easy, dataclasses.replace(HP, lr=10.0), cfg, seed=s) for s in range(3)]
    loss = {k: statistics.median(r.best_val_loss for r in runs) for k, runs in (("good", good), ("bad", bad))}
    acc = {k: statistics.median(r.best_val_accuracy for r in runs) for k, runs in (("good", good), ("bad", bad))}
    assert acc["good"] > 0.8  # 24 validation samples: one of them is 4 points; chance is 1/3
    assert loss["bad"] > 1.3 * loss["good"] and acc["bad"] < acc["good"] - 0.1


# mean pooling: with the default max pooling the same net memorises the 150 samples too (train loss
# 0.001) but its val loss rises by less than 0.1, too little to show overfitting on a curve this short
BIG = dataclasses.replace(HP, lr=1e-3, hidden_dim=64, n_layers=2, n_heads=4, dropout=0.0, weight_decay=0.0,
                          pooling="mean")


@pytest.fixture(scope="module")
def big_run(hard):
    return _run(hard, BIG, dataclasses.replace(CFG, epochs=30))


def test_big_model_without_dropout_overfits(big_run):
    last = big_run.history[-1]
    assert min(m.train_loss for m in big_run.history) < 0.3  # it memorises the training set
    assert last.train_loss < 0.5 * last.val_loss  # train loss << val loss
    assert last.val_loss > big_run.best_val_loss + 0.3  # and val loss has risen past its best


def test_tiny_model_underfits(hard, big_run):
    tiny = dataclasses.replace(BIG, hidden_dim=2, n_layers=1, n_heads=1)
    small = _run(hard, tiny, dataclasses.replace(CFG, epochs=30))
    assert min(m.train_loss for m in small.history) > 0.9  # cannot even fit the training set
    assert min(m.train_loss for m in big_run.history) < 0.3


def test_cuda_graph_mode_trains_eagerly_off_cuda(easy):
    """CUDA graphs exist only on CUDA: elsewhere the mode is plain eager training, not an error."""
    from cycle_optuna import train

    cfg = dataclasses.replace(CFG, epochs=2, compile="cudagraphs")
    model = build_model(easy, HP, cfg)
    assert train._compiled(model, cfg, torch.device("cpu"), steps=10_000) is model
    assert _curve(_run(easy, cfg=cfg)) == _curve(_run(easy, cfg=dataclasses.replace(CFG, epochs=2)))


def test_cuda_graphs_wait_until_a_shape_has_trained_enough_steps_in_the_worker(easy, monkeypatch):
    """A worker compiles a shape once its trials of that shape, the current one included, reach the
    break-even step count; later trials of that shape reuse it, and another shape counts apart."""
    from cycle_optuna import train

    monkeypatch.setattr(train, "_SHAPE_STEPS", {})
    monkeypatch.setattr(train, "CUDAGRAPH_MIN_STEPS", 1000)
    batch = (16, *easy.x_train.shape[1:])
    seed = train.graph_shape(HP, batch)
    assert [train._graphs_pay(seed, 400) for _ in range(4)] == [False, False, True, True]
    # the rates are graph inputs: the same shape; heads, width or batch size are another
    assert train.graph_shape(dataclasses.replace(HP, lr=HP.lr * 3, dropout=HP.dropout / 2), batch) == seed
    others = [train.graph_shape(dataclasses.replace(HP, n_heads=1), batch),
              train.graph_shape(dataclasses.replace(HP, hidden_dim=32), batch),
              train.graph_shape(HP, (32, *easy.x_train.shape[1:]))]
    assert not any(train._graphs_pay(shape, 400) for shape in others)
    assert train._graphs_pay(others[0], 600)


def test_balanced_class_weights_make_each_class_weigh_as_an_average_sized_one():
    from cycle_optuna.train import class_weight

    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2])  # 6, 2, 4 of 12: an average class holds 4
    w = class_weight(y, 4, "balanced")  # class 3 absent from this split (a cross-validation fold's)
    assert w.tolist() == pytest.approx([12 / 18, 12 / 6, 12 / 12, 0.0])
    assert float((w[y]).sum()) == pytest.approx(len(y))  # the loss's scale stays that of the unweighted mean
    assert class_weight(y, 4, "none") is None


def _balanced_loss(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The mean over the classes present of each class's mean cross-entropy, written out."""
    each = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    return statistics.mean(float(each[y == c].mean()) for c in y.unique())


def test_under_balanced_class_weights_cycles_are_ranked_on_the_balanced_validation_loss(easy):
    """The objective follows the training's weights: with class_weights = "balanced" the validation
    loss is each class's mean loss averaged over the classes, so a model that gives up a small class
    no longer ranks first by doing well on the large one."""
    keep = (easy.y_val == 0) | (torch.arange(len(easy.y_val)) % 5 == 0)  # classes 1 and 2 thinned to a fifth
    skewed = dataclasses.replace(easy, x_val=easy.x_val[keep], y_val=easy.y_val[keep])
    cfg = dataclasses.replace(CFG, epochs=3, class_weights="balanced")
    res = _run(skewed, cfg=cfg)
    with torch.inference_mode():
        res.model.eval()
        logits = res.model(skewed.x_val).float()
    plain = float(torch.nn.functional.cross_entropy(logits, skewed.y_val))
    assert res.best_val_loss == pytest.approx(_balanced_loss(logits, skewed.y_val), rel=1e-5)
    assert res.best_val_loss != pytest.approx(plain, rel=1e-3)  # the skew does change it
    # unweighted without class weights, and `evaluate` weighs per series as given
    unweighted = _run(skewed, cfg=dataclasses.replace(cfg, class_weights="none"))
    with torch.inference_mode():
        unweighted.model.eval()
        assert unweighted.best_val_loss == pytest.approx(
            float(torch.nn.functional.cross_entropy(unweighted.model(skewed.x_val).float(), skewed.y_val)), rel=1e-5)
    from cycle_optuna.train import validation_weight
    w = validation_weight(skewed.y_val, skewed.n_classes, "balanced")
    assert evaluate(res.model, skewed.x_val, skewed.y_val, 7, weight=w)[0] == pytest.approx(
        _balanced_loss(logits, skewed.y_val), rel=1e-5)  # batches of 7: the weights follow their series
    assert validation_weight(skewed.y_val, skewed.n_classes, "none") is None


def test_balanced_weights_with_label_smoothing_keep_a_series_answer_its_own_class():
    """F.cross_entropy's own `weight` also weighs the smoothed targets by the other classes' weights:
    at 99 to 1 the loss was lowest when a large-class series answered the small class (84%), and a
    study with class_weights = "balanced" predicted the small class for every series."""
    from cycle_optuna.train import class_weight, training_loss

    w = class_weight(torch.tensor([0] * 99 + [1]), 2, "balanced")
    for label in (0, 1):
        z = torch.zeros(1, 2, requires_grad=True)
        opt = torch.optim.Adam([z], lr=0.1)
        for _ in range(300):
            opt.zero_grad()
            training_loss(z, torch.tensor([label]), w, 0.1).backward()
            opt.step()
        p = torch.softmax(z.detach(), dim=1)[0]
        assert p[label] == pytest.approx(0.95, abs=0.01)  # the smoothed target of its own class, whatever its weight
    # weighed per series, the batch mean: a batch's loss is its series' losses times their class weights
    logits, y = torch.randn(4, 2), torch.tensor([0, 0, 0, 1])
    each = torch.nn.functional.cross_entropy(logits, y, reduction="none", label_smoothing=0.1)
    assert float(training_loss(logits, y, w, 0.1)) == pytest.approx(float((each * w[y]).mean()))
