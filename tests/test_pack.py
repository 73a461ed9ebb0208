"""Packed trials on the CPU: a member trains as it would alone, and ends, reports and resumes on its own."""

from __future__ import annotations

import dataclasses
import math

import optuna
import pytest
import torch

from cycle_optuna import pack
from cycle_optuna.config import DataConfig, Hyperparams, TrainConfig
from cycle_optuna.data import load_task
from cycle_optuna.train import EpochMetrics, train_and_evaluate

HP = Hyperparams(lr=3e-3, batch_size=16, hidden_dim=16, n_layers=1, n_heads=2, dropout=0.1, weight_decay=0.01)
# label smoothing off: its loss differs between the vmapped and the plain path by float rounding
# (~2e-5), above the tolerance these packed-against-alone comparisons use
CFG = TrainConfig(epochs=3, schedule="cosine", warmup_epochs=0.5, early_stopping_patience=0, device="cpu",
                  augment_jitter=0.1, label_smoothing=0.0,
                 min_epoch_samples=0)  # few steps: the kernels' float rounding compounds with every step
# one incumbent's lr, dropout and weight decay moves: the CycleSampler's parallel proposals
MOVES = [HP, dataclasses.replace(HP, lr=6e-3), dataclasses.replace(HP, dropout=0.3),
         dataclasses.replace(HP, lr=1.5e-3, weight_decay=0.1)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return load_task(DataConfig(n_samples=300, seq_len=8, n_features=4), 0)


@pytest.fixture(scope="module")
def alone(data):
    return [train_and_evaluate(data, hp, CFG, seed=0) for hp in MOVES]


def _curve(r):
    return [(m.epoch, m.train_loss, m.val_loss, m.val_accuracy, m.lr, m.nan_batches) for m in r.history]


def _assert_close(packed, single, tol=1e-4):  # float rounding: vmapped math attention vs the fused kernel
    assert len(packed.history) == len(single.history)
    for p, s in zip(_curve(packed), _curve(single)):
        assert p[0] == s[0] and p[5] == s[5]
        assert p[1:5] == pytest.approx(s[1:5], rel=tol, abs=tol)
    assert packed.best_epoch == single.best_epoch
    assert packed.best_val_loss == pytest.approx(single.best_val_loss, rel=tol)
    # weights as a whole: Adam turns the float noise of an exactly-zero gradient (the key bias under
    # softmax) into lr-sized steps, so single coordinates may differ more than the model does
    a = torch.cat([v.flatten() for v in packed.model.state_dict().values()])
    b = torch.cat([v.flatten() for v in single.model.state_dict().values()])
    assert (a - b).norm() <= 1e-3 * b.norm()


def test_a_packed_trial_trains_as_it_does_alone(data, alone):
    packed = pack.train_pack(data, MOVES, CFG, seed=0)
    for p, s in zip(packed, alone):
        _assert_close(p, s)
    # the moves do matter: the members ended in different places
    assert len({round(r.best_val_loss, 5) for r in packed}) == len(MOVES)


@pytest.mark.parametrize("knob", ["summary_features", "step_conv"])
def test_a_model_switch_packs_as_it_trains_alone(data, knob):
    hps = [dataclasses.replace(hp, **{knob: True}) for hp in MOVES[:2]]
    packed = pack.train_pack(data, hps, CFG, seed=0)
    for p, hp in zip(packed, hps):
        _assert_close(p, train_and_evaluate(data, hp, CFG, seed=0))
    assert pack.pack_key(hps[0]) != pack.pack_key(MOVES[0])  # a shape of its own


def test_balanced_class_weights_pack_as_they_train_alone(data):
    """[train] class_weights = "balanced" weighs the training and the validation loss by class, packed as alone."""
    keep = (data.y_train == 0) | (torch.arange(len(data.y_train)) % 4 == 0)  # classes 1 and 2 thinned to a quarter
    keep_va = (data.y_val == 0) | (torch.arange(len(data.y_val)) % 4 == 0)  # and in the validation loss's weights
    skewed = dataclasses.replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep],
                                 x_val=data.x_val[keep_va], y_val=data.y_val[keep_va])
    cfg = dataclasses.replace(CFG, class_weights="balanced")
    packed = pack.train_pack(skewed, MOVES[:2], cfg, seed=0)
    for p, hp in zip(packed, MOVES[:2]):
        _assert_close(p, train_and_evaluate(skewed, hp, cfg, seed=0))
    plain = train_and_evaluate(skewed, MOVES[0], CFG, seed=0)  # the weights do change the training
    assert packed[0].history[0].train_loss != pytest.approx(plain.history[0].train_loss, rel=1e-3)


def test_packed_summary_statistics_computed_once_train_as_recomputed_per_step(data, monkeypatch):
    from cycle_optuna import train

    hps = [dataclasses.replace(hp, summary_features=True) for hp in MOVES[:2]]
    cfg = dataclasses.replace(CFG, augment_jitter=0.0)  # augmented batches are always computed per step
    once = pack.train_pack(data, hps, cfg, seed=0)
    monkeypatch.setattr(train, "summaries", lambda model, x: None)  # the forward pass computes them per batch
    for p, s in zip(once, pack.train_pack(data, hps, cfg, seed=0)):
        _assert_close(p, s)


def test_a_pruned_member_leaves_and_the_others_are_unchanged(data):
    full = pack.train_pack(data, MOVES, CFG, seed=0)

    class Pruned(Exception):
        pass

    seen: list[EpochMetrics] = []

    def prune_at_epoch_1(m: EpochMetrics) -> None:
        seen.append(m)
        if m.epoch == 1:
            raise Pruned

    reports = [None, prune_at_epoch_1, None, None]
    out = pack.train_pack(data, MOVES, CFG, seed=0, reports=reports)
    assert isinstance(out[1], Pruned) and [m.epoch for m in seen] == [0, 1]
    assert _curve(full[1])[:2] == [(m.epoch, m.train_loss, m.val_loss, m.val_accuracy, m.lr, m.nan_batches)
                                   for m in seen]
    for i in (0, 2, 3):
        assert len(out[i].history) == CFG.epochs
        for p, s in zip(_curve(out[i]), _curve(full[i])):
            assert p == pytest.approx(s, rel=1e-6, abs=1e-7)


def test_each_member_stops_early_on_its_own(data):
    # only the slow-learning member fails to improve by min_delta: it alone stops after the patience
    cfg = dataclasses.replace(CFG, epochs=5, schedule="constant", warmup_epochs=0, early_stopping_patience=3,
                              min_delta=0.003, augment_jitter=0.0)
    hps = [HP, dataclasses.replace(HP, lr=1e-5)]
    out = pack.train_pack(data, hps, cfg, seed=0)
    alone = [train_and_evaluate(data, hp, cfg, seed=0) for hp in hps]
    assert [r.stopped_early for r in out] == [r.stopped_early for r in alone] == [False, True]
    assert [len(r.history) for r in out] == [5, 4]
    for p, s in zip(out, alone):
        _assert_close(p, s)


def test_a_packed_members_checkpoint_resumes_alone(data, alone):
    states: dict[int, dict] = {}

    def keep(i):
        return lambda epoch, state: states.setdefault(epoch, {}).__setitem__(i, state)

    pack.train_pack(data, MOVES, CFG, seed=0, checkpoints=[keep(i) for i in range(len(MOVES))])
    assert sorted(states) == list(range(CFG.epochs)) and len(states[0]) == len(MOVES)
    state = states[0][2]
    assert state["epoch"] == 0 and state["optimizer"]["state"]  # Adam moments, in torch's own format
    torch.manual_seed(123)  # whatever ran in between must not matter
    resumed = train_and_evaluate(data, MOVES[2], CFG, seed=0, resume=state)
    _assert_close(resumed, alone[2])


def test_packs_group_trials_by_shape(data):
    wide = dataclasses.replace(HP, hidden_dim=32)
    no_dropout = dataclasses.replace(HP, dropout=0.0)
    hps = [HP, wide, dataclasses.replace(HP, lr=1e-2), no_dropout, dataclasses.replace(wide, dropout=0.2),
           dataclasses.replace(HP, weight_decay=0.5), dataclasses.replace(HP, batch_size=32)]
    assert pack.groups(hps, data, CFG, size=8) == [[0, 2, 5], [1, 4], [3], [6]]
    assert pack.groups(hps, data, CFG, size=2) == [[0, 2], [1, 4], [3], [5], [6]]
    assert pack.groups(hps, data, CFG, size=1) == [[i] for i in range(len(hps))]
    sgd = dataclasses.replace(CFG, optimizer="sgd")  # the population's update is Adam's
    assert pack.groups(hps, data, sgd, size=8) == [[i] for i in range(len(hps))]


def test_a_model_without_dropout_modules_packs_dropout_as_shape(data, monkeypatch):
    """Per-member dropout needs nn.Dropout modules; a model without them still packs, by exact rate."""
    from cycle_optuna import train

    build = train.build_model

    def functional_dropout_model(d, hp, cfg):
        model = build(d, hp, cfg)
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, torch.nn.Dropout):
                    setattr(module, name, torch.nn.Identity())
        return model

    monkeypatch.setattr(train, "build_model", functional_dropout_model)
    hps = [HP, dataclasses.replace(HP, lr=1e-2), dataclasses.replace(HP, dropout=0.3)]
    assert pack.groups(hps, data, CFG, size=8) == [[0, 1], [2]]


def test_train_pack_refuses_mixed_shapes(data):
    with pytest.raises(ValueError, match="share a shape"):
        pack.train_pack(data, [HP, dataclasses.replace(HP, n_layers=2)], CFG, seed=0)


def test_a_diverging_member_ends_alone(data):
    """Non-finite steps are skipped per member: a member whose lr blows it up diverges as it would
    alone while the rest of the population trains on."""
    cfg = dataclasses.replace(CFG, grad_clip=0.0, max_bad_batches=2, augment_jitter=0.0)
    hps = [HP, dataclasses.replace(HP, lr=1e30)]
    out = pack.train_pack(data, hps, cfg, seed=0)
    alone = [train_and_evaluate(data, hp, cfg, seed=0) for hp in hps]
    assert alone[1].diverged and out[1].diverged and not out[0].diverged
    assert len(out[1].history) == len(alone[1].history) and out[1].nan_batches == alone[1].nan_batches
    _assert_close(out[0], alone[0])
    assert all(math.isfinite(m.val_loss) for m in out[0].history)


# --- a packing worker on a real study ------------------------------------------------------------

STUDY = """
[study]
name = "{name}"
n_trials = 4
seed = 0

[data]
n_samples = 200
seq_len = 8
n_features = 4
noise = 0.3

[train]
epochs = 3
device = "cpu"
pack = {pack}

[baseline]
lr = 3e-3
batch_size = 32
hidden_dim = 16
n_layers = 1
n_heads = 2
dropout = 0.1

[space]
lr = {{ low = 1e-4, high = 1e-2, log = true }}
dropout = {{ low = 0.05, high = 0.3 }}
weight_decay = {{ low = 0.0, high = 0.1 }}

[sampler]
type = "random"

[pruner]
type = "none"
"""


def test_a_packing_worker_ends_each_trial_with_its_own_values_and_attrs(tmp_path, monkeypatch):
    from cycle_optuna import config, objective, storage, worker

    packs = []
    real = pack.train_pack

    def recording(data, hps, cfg, **kw):
        packs.append(len(hps))
        return real(data, hps, cfg, **kw)

    monkeypatch.setattr(objective.pack, "train_pack", recording)
    studies = {}
    for name, size in (("packed", 4), ("alone", 1)):
        path = tmp_path / f"{name}.toml"
        path.write_text(STUDY.format(name=name, pack=size))
        cfg = config.load(path)
        studies[name] = worker.run_worker(cfg, storage.resolve_url(cfg))
    assert packs == [4]  # the packed study trained its four trials as one population; the other alone
    packed, alone = (sorted(studies[n].trials, key=lambda t: t.number) for n in ("packed", "alone"))
    assert [t.params for t in packed] == [t.params for t in alone]  # the same four configurations
    assert len({t.value for t in packed}) == 4
    for p, a in zip(packed, alone):
        assert p.state == a.state == optuna.trial.TrialState.COMPLETE
        assert p.value == pytest.approx(a.value, rel=1e-5)
        assert list(p.intermediate_values.values()) == pytest.approx(list(a.intermediate_values.values()), rel=1e-5)
        for key in ("epochs_run", "diagnosis", "n_params", "nan_batches"):
            assert p.user_attrs[key] == a.user_attrs[key], key
        assert p.user_attrs["val_accuracy"] == pytest.approx(a.user_attrs["val_accuracy"])
        assert p.user_attrs[storage.DEVICE_ATTR] == "cpu" and storage.WORKER_ATTR in p.user_attrs
    assert not list(tmp_path.glob("packed-artifacts/checkpoint-*"))  # each member's checkpoints went
    # the models of the pack's best 3 (`[study] ensemble`) are kept, as for trials run one by one
    kept = {t.number for t in packed if "model_artifact_id" in t.user_attrs}
    assert kept == {t.number for t in sorted(packed, key=lambda t: t.value)[:3]}


def test_an_interrupted_pack_hands_every_member_back_and_each_resumes(tmp_path, monkeypatch):
    from cycle_optuna import config, objective, storage, worker

    path = tmp_path / "cut.toml"
    path.write_text(STUDY.format(name="cut", pack=4))
    cfg = config.load(path)
    url = storage.resolve_url(cfg)
    save = objective.TrialCheckpoints.save

    def stop_after_second_epoch(self, epoch, state):
        save(self, epoch, state)
        if epoch == 1 and self.trial.number == 3:  # the last member's checkpoint: all four have theirs
            raise KeyboardInterrupt  # as on SIGTERM

    monkeypatch.setattr(objective.TrialCheckpoints, "save", stop_after_second_epoch)
    stats = worker.WorkerStats()
    with pytest.raises(KeyboardInterrupt):
        worker.run_worker(cfg, url, stats=stats)
    assert sorted(stats.requeued) == [0, 1, 2, 3]
    monkeypatch.setattr(objective.TrialCheckpoints, "save", save)
    study = worker.run_worker(cfg, url)
    first, retries = study.trials[:4], study.trials[4:]
    assert all(t.state == optuna.trial.TrialState.FAIL for t in first)
    assert sorted(t.user_attrs[objective.RESUMED_ATTR] for t in retries) == [f"trial {n} epoch 2" for n in range(4)]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in retries)

    path = tmp_path / "whole.toml"
    path.write_text(STUDY.format(name="whole", pack=4))
    whole = worker.run_worker(config.load(path), storage.resolve_url(config.load(path)))
    by_params = {tuple(sorted(t.params.items())): t.value for t in whole.trials}
    for t in retries:  # resumed alone from a packed checkpoint: the value of the uninterrupted pack
        assert t.value == pytest.approx(by_params[tuple(sorted(t.params.items()))], rel=1e-5)
    assert not list(tmp_path.glob("cut-artifacts/checkpoint-*"))
