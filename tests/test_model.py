"""The transformer classifier: each knob does what docs/model.md says, padding is invisible, order matters."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cycle_optuna import cli, config
from cycle_optuna.config import DataConfig, Hyperparams, TrainConfig
from cycle_optuna.data import TaskData
from cycle_optuna.errors import ConfigError
from cycle_optuna.model import POOLINGS, POS_ENCODINGS, TransformerClassifier, auto_patch_len, count_params
from cycle_optuna.train import evaluate, train_and_evaluate

BASE = dict(n_features=5, n_classes=3, seq_len=12, hidden_dim=16, n_layers=2, n_heads=4, dropout=0.1)


def _model(**kw) -> TransformerClassifier:
    torch.manual_seed(0)
    return TransformerClassifier(**{**BASE, **kw}).eval()


def test_output_shape():
    logits = _model()(torch.randn(7, 12, 5))
    assert logits.shape == (7, 3)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("patch_len, conv_stem, pos_encoding, pooling, instance_norm", [
    (1, 0, "sinusoidal", "mean", False), (3, 1, "rotary", "cls", True), (4, 2, "learned", "last", False),
    (5, 3, "none", "mean", True), (12, 2, "rotary", "last", True), (0, 2, "sinusoidal", "cls", False),
])
def test_every_knob_combination_gives_class_logits_and_trains(patch_len, conv_stem, pos_encoding, pooling,
                                                              instance_norm):
    m = _model(patch_len=patch_len, conv_stem=conv_stem, pos_encoding=pos_encoding, pooling=pooling,
               instance_norm=instance_norm).train()
    x = torch.randn(4, 12, 5)
    x[0, 9:] = math.nan  # padding must not poison the gradients either
    out = m(x)
    assert out.shape == (4, 3)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_patch_len_sets_the_number_of_tokens():
    assert [_model(patch_len=p).n_tokens for p in (1, 2, 5, 12)] == [12, 6, 3, 1]
    seen = []
    m = _model(patch_len=4)
    m.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    m(torch.randn(2, 12, 5))
    assert seen == [torch.Size([2, 3, 16])]
    # patches share one linear map of patch_len steps: its size grows with the patch
    assert count_params(_model(patch_len=4)) - count_params(_model(patch_len=1)) == 3 * 5 * 16


def test_auto_patch_len_keeps_at_least_16_tokens():
    assert [auto_patch_len(t) for t in (16, 30, 32, 150, 427, 1460)] == [1, 1, 2, 8, 16, 64]
    assert _model(patch_len=0).patch_len == 1
    assert TransformerClassifier(**{**BASE, "seq_len": 150, "patch_len": 0}).patch_len == 8


def test_conv_stem_adds_layers_with_the_documented_kernels():
    assert [c.kernel_size[0] for c in _model(conv_stem=3).stem] == [5, 3, 3]
    assert len(_model(conv_stem=0).stem) == 0
    assert count_params(_model(conv_stem=1)) - count_params(_model(conv_stem=0)) == 16 * 16 * 5 + 16


def test_pooling_changes_what_the_head_reads():
    x = torch.randn(3, 12, 5)
    mean, last, top = _model(pooling="mean"), _model(pooling="last"), _model(pooling="max")
    last.load_state_dict(mean.state_dict())
    top.load_state_dict(mean.state_dict())
    assert not torch.allclose(mean(x), last(x))
    assert not torch.allclose(mean(x), top(x))
    assert hasattr(_model(pooling="cls"), "cls") and not hasattr(mean, "cls")


def test_instance_norm_makes_the_body_ignore_level_and_scale_except_through_the_stats():
    m = _model(instance_norm=True)
    x = torch.randn(3, 12, 5)
    with torch.no_grad():
        m.stats.weight.zero_()  # cut the level/scale path: only the shape of each series is left
    assert torch.allclose(m(x), m(3 * x + 7), atol=1e-4)
    with torch.no_grad():
        m.stats.weight.normal_()
    assert not torch.allclose(m(x), m(3 * x + 7), atol=1e-4)  # level and scale still reach the head


def test_summary_features_start_silent_and_reach_the_head_only_through_their_branch():
    m = _model(summary_features=True)
    x = torch.randn(3, 12, 5)
    plain = _model()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("summary")})
    # a new model is the transformer alone: the branch's output layer starts at zero
    assert torch.count_nonzero(m.summary[2].weight) == 0 and torch.count_nonzero(m.summary[0].weight) > 0
    assert torch.allclose(m(x), plain(x), atol=1e-6)
    with torch.no_grad():
        m.summary[2].weight.normal_(std=0.02)  # as training moves it
    assert not torch.allclose(m(x), plain(x), atol=1e-6)  # the branch adds to the pooled vector
    with torch.no_grad():
        m.summary[2].weight.zero_()  # cut the branch: the rest is the plain model, weight for weight
    assert torch.allclose(m(x), plain(x), atol=1e-6)


def test_the_summary_branch_reads_statistics_standardised_by_the_training_series():
    """Unscaled, a statistic whose spread across series is small (a short burst moves a long series'
    std by a few %) barely moved the branch: a 3,000-step burst set stayed at chance (test 0.43, the
    MLP reference on the same statistics, standardised, 0.55; standardised here 0.61)."""
    from cycle_optuna import train
    from cycle_optuna.data import load_task

    data = load_task(DataConfig(n_samples=60, seq_len=12, n_features=5, folds=1), seed=0)
    hp = Hyperparams(hidden_dim=16, n_layers=1, n_heads=2, summary_features=True)
    m = train.build_model(data, hp, TrainConfig())
    feats = train.summaries(m, data.x_train)
    z = (feats - m.summary_mu) / m.summary_sd
    varies = feats.std(0) > 1e-6
    assert varies.sum() > 10 and torch.allclose(z.mean(0), torch.zeros(()), atol=1e-4)
    assert torch.allclose(z.std(0, unbiased=False)[varies], torch.ones(()), atol=1e-3)
    assert torch.equal(m.summary_sd[~varies], torch.ones(int((~varies).sum())))  # a constant one is left as it is
    # the scaling travels with the model: saved and loaded, it is the same function
    again = TransformerClassifier(**train.model_kwargs(data, hp, 1.0)).eval()
    again.load_state_dict(m.state_dict())
    m.eval()
    assert torch.equal(again(data.x_val), m(data.x_val))
    # a model saved before the scaling existed loads and reads its statistics as they are, as it was trained
    old = {k: v for k, v in m.state_dict().items() if k not in ("summary_mu", "summary_sd")}
    again.load_state_dict(old)
    assert torch.equal(again.summary_mu, torch.zeros_like(m.summary_mu)) and torch.equal(again.summary_sd, torch.ones_like(m.summary_sd))
    assert "summary_mu" not in train.build_model(data, Hyperparams(hidden_dim=16, n_layers=1, n_heads=2), TrainConfig()).state_dict()


@pytest.mark.parametrize("shape", [False, True])
def test_summary_features_train_and_ignore_padding(shape):
    m = _model(summary_features=True, instance_norm=True, summary_of_shape=shape).train()
    x = torch.randn(4, 12, 5)
    x[0, 9:] = math.nan
    x[1, 4, 2] = math.nan  # a missing value inside a series
    loss = torch.nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    # the zeroed output layer learns at once, and after one step the layer before it does too
    assert m.summary[2].weight.grad.abs().sum() > 0
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    m.zero_grad()
    torch.nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 2, 0])).backward()
    assert m.summary[0].weight.grad.abs().sum() > 0
    m.eval()
    short = torch.randn(2, 8, 5)  # a shorter series is the same series padded to seq_len
    padded = torch.cat((short, torch.full((2, 4, 5), math.nan)), dim=1)
    assert torch.allclose(m(short), m(padded), atol=1e-5)


def test_with_instance_norm_the_summary_branch_reads_the_shape_and_the_level_and_scale_apart():
    """Recordings at their own offset and gain: with instance_norm the summary statistics are those of
    each series z-normalised, followed by its level and log-scale per feature, so an offset or a gain
    moves 2 figures per feature, not nearly every statistic (ArrowHead with a random offset and gain
    per series, one cycle of the baseline model with both on, 3 seeds: 72.7% -> 78.7% test accuracy)."""
    from cycle_optuna import train
    from cycle_optuna.data import load_task
    from cycle_optuna.features import summary_features

    m = _model(summary_features=True, instance_norm=True, summary_of_shape=True)
    x = torch.randn(6, 12, 5, dtype=torch.float64).float()
    x[1, 9:] = math.nan  # padding
    x[4, 3, 2] = math.nan  # a missing value
    gain = torch.tensor([0.3, 1.0, 2.0, 3.0, 0.5, 1.7])[:, None, None]
    offset = torch.tensor([-5.0, 0.0, 4.0, 10.0, 1.0, -2.0])[:, None, None]
    a, b = m.summary_of(x), m.summary_of(x * gain + offset)
    d = a.shape[1] - 2 * 5
    assert d == summary_features(x).shape[1] and m.summary_mu.shape[0] == d + 10
    assert torch.allclose(a[:, :d], b[:, :d], atol=1e-3)  # the shape's statistics do not move
    assert torch.allclose(b[:, d:d + 5], a[:, d:d + 5] * gain[:, 0] + offset[:, 0], atol=1e-4)  # the level
    assert torch.allclose(b[:, d + 5:], a[:, d + 5:] + gain[:, 0].log(), atol=1e-4)  # the log-scale
    assert torch.isfinite(m(x)).all() and m(x).shape == (6, 3)
    # a model saved before (no summary_of_shape in its kwargs) reads the statistics of the series as they are
    plain = _model(summary_features=True, instance_norm=True)
    assert torch.equal(plain.summary_of(x), summary_features(x).float())
    # the level weights draw from a generator of their own: every other weight is the one drawn without them
    shared = plain.state_dict()
    for key, value in m.state_dict().items():
        if key in shared and not key.startswith(("summary_mu", "summary_sd")):
            assert torch.equal(value, shared[key]), key
    # new models read the shape only where both knobs are on
    data = load_task(DataConfig(n_samples=30, seq_len=12, n_features=5, folds=1), seed=0)
    for inorm, summ in ((True, True), (True, False), (False, True)):
        hp = Hyperparams(hidden_dim=16, n_layers=1, n_heads=2, instance_norm=inorm, summary_features=summ)
        assert train.build_model(data, hp, TrainConfig()).summary_of_shape is (inorm and summ)


def test_summary_given_beforehand_is_the_one_forward_computes():
    """Training passes each batch's rows of statistics computed once for the data set (in slices);
    they must be exactly what the forward pass computes from the batch itself."""
    from cycle_optuna import train

    m = _model(summary_features=True)
    with torch.no_grad():
        m.summary[2].weight.normal_(std=0.02)  # as after training (a new branch adds zero)
    x = torch.randn(9, 12, 5)
    x[2, 7:] = math.nan  # padding
    x[5, 3, 1] = math.nan  # a missing value
    whole = train.summaries(m, x)
    assert torch.equal(whole[2:6], m.summary_of(x[2:6]))  # rows do not depend on the batch
    assert torch.allclose(m(x[2:6], whole[2:6]), m(x[2:6]), atol=1e-6)
    assert not torch.allclose(m(x[2:6], whole[5:9]), m(x[2:6]), atol=1e-4)  # the argument is what the branch reads
    assert train.summaries(_model(), x) is None  # no branch, nothing computed
    old = train.SUMMARY_CHUNK_VALUES
    try:
        train.SUMMARY_CHUNK_VALUES = 2 * 12 * 5  # two series per slice: slices join to the same rows
        assert torch.equal(train.summaries(m, x), whole)
    finally:
        train.SUMMARY_CHUNK_VALUES = old


def test_init_is_normal_002_with_residual_projections_scaled_by_depth():
    m = _model(hidden_dim=64, n_heads=4, n_layers=4, init_gain=1.0)
    assert m.blocks[0].qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    for b in m.blocks:
        assert b.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.15)
        assert b.mlp[2].weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert m.embed.weight.std().item() == pytest.approx(1 / math.sqrt(5), rel=0.3)  # unit-variance stem
    assert all(torch.count_nonzero(mod.bias) == 0 for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    half = _model(hidden_dim=64, n_heads=4, n_layers=4, init_gain=0.5)
    assert half.blocks[0].qkv.weight.std().item() == pytest.approx(0.01, rel=0.1)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("patch_len, conv_stem, step_conv", [(1, 0, False), (2, 2, False), (3, 1, True)])
def test_padded_steps_never_change_the_output(pos_encoding, pooling, patch_len, conv_stem, step_conv):
    m = _model(pos_encoding=pos_encoding, pooling=pooling, patch_len=patch_len, conv_stem=conv_stem,
               instance_norm=pooling == "cls", step_conv=step_conv)
    x = torch.randn(2, 8, 5)
    padded = torch.cat((x, torch.full((2, 4, 5), math.nan)), dim=1)
    ref = m(x)
    assert torch.allclose(m(padded), ref, atol=1e-5)  # trailing NaN steps = the shorter series
    mixed = torch.cat((padded, torch.randn(1, 12, 5)))  # an unpadded row in the batch turns the mask on
    assert torch.allclose(m(mixed)[:2], ref, atol=1e-5)
    assert torch.isfinite(m(mixed)).all()


def test_a_series_without_any_data_gives_finite_logits():
    for pooling in POOLINGS:
        x = torch.randn(2, 12, 5)
        x[1] = math.nan
        assert torch.isfinite(_model(pooling=pooling, instance_norm=True)(x)).all()


def test_missing_steps_inside_a_series_are_masked_and_partial_nans_are_filled():
    m = _model(conv_stem=0, pos_encoding="none")  # a bag of steps: only the present steps count
    x = torch.randn(1, 12, 5)
    holed = x.clone()
    holed[0, 3] = math.nan
    assert torch.allclose(m(holed), m(torch.cat((x[:, :3], x[:, 4:]), dim=1)), atol=1e-5)
    x[0, 5, 2] = math.nan
    assert torch.isfinite(_model()(x)).all() and torch.isfinite(_model(instance_norm=True)(x)).all()


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "rotary", "learned"])
def test_positions_make_the_model_order_sensitive(pos_encoding):
    # rotary acts on attention scores, which start near zero under N(0, 0.02): a larger gain shows it
    m = _model(pos_encoding=pos_encoding, conv_stem=0, patch_len=1, pooling="mean", init_gain=10.0)
    x = torch.randn(4, 12, 5)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(m(x), m(x[:, perm]), atol=1e-4)


def test_without_positions_stem_or_patches_mean_pooling_is_a_bag_of_steps():
    m = _model(pos_encoding="none", conv_stem=0, patch_len=1, pooling="mean")
    x = torch.randn(4, 12, 5)
    assert torch.allclose(m(x), m(x[:, torch.randperm(12)]), atol=1e-5)
    assert not torch.allclose(_model(pos_encoding="none", conv_stem=2)(x),
                              _model(pos_encoding="none", conv_stem=2)(x[:, torch.randperm(12)]), atol=1e-4)


def test_step_conv_reads_neighbouring_steps_and_trains():
    """step_conv: a convolution over the raw steps before the patches. Without positions, stem or
    patches the model is a bag of steps; the step convolution alone makes it read each step's
    neighbours, so reordering the steps changes the output."""
    m = _model(pos_encoding="none", conv_stem=0, patch_len=1, pooling="mean", step_conv=True)
    x = torch.randn(4, 12, 5)
    assert not torch.allclose(m(x), m(x[:, torch.randperm(12)]), atol=1e-4)
    assert m.step_conv.kernel_size == (7,) and m.embed.in_channels == 16 // 2
    m.train()
    x[0, 9:] = math.nan
    x[1, 4, 2] = math.nan
    m(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.step_conv.weight.grad.abs().sum() > 0
    assert _model().step_conv is None  # off by default: the plain patch embedding


@pytest.mark.parametrize("n_features, patch_len", [(1, 1), (1, 4), (5, 3)])
def test_patch_map_and_step_conv_compute_the_convolutions_their_weights_describe(n_features, patch_len):
    """forward runs the patch map and step_conv as matrix products over each patch's / window's steps
    (faster on the CPU than the convolutions); the weights are the Conv1d modules', so a model
    saved by any version loads and computes the same function."""
    m = _model(n_features=n_features, patch_len=patch_len, step_conv=True)
    h = torch.randn(3, 12, n_features)
    conv = torch.nn.functional.conv1d(h.transpose(1, 2), m.step_conv.weight, m.step_conv.bias, padding=3)
    assert torch.allclose(m._step_windows(h), conv.transpose(1, 2), atol=1e-5)
    g = torch.randn(3, 12, m.embed.in_channels)
    assert torch.allclose(m._patches(g), m.embed(g.transpose(1, 2)).transpose(1, 2), atol=1e-5)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"but got hidden_dim=18, n_heads=4\."):
        _model(hidden_dim=18)
    with pytest.raises(ValueError, match=r"patch_len=13"):
        _model(patch_len=13)
    with pytest.raises(ValueError, match=r"pos_encoding='alibi'"):
        _model(pos_encoding="alibi")
    with pytest.raises(ValueError, match=r"pooling='median'"):
        _model(pooling="median")
    with pytest.raises(ValueError, match=r"rotary positions need an even head size"):
        _model(hidden_dim=12, n_heads=4, pos_encoding="rotary")


def test_longer_sequences_rejected():
    with pytest.raises(ValueError, match="t=13"):
        _model()(torch.randn(2, 13, 5))


def test_param_count_grows_with_capacity_and_ignores_frozen():
    base = count_params(_model())
    assert count_params(_model(hidden_dim=32)) > base
    assert count_params(_model(n_layers=3)) > base
    assert count_params(_model(n_heads=2)) == base  # heads split the width, they add no parameters
    m = _model()
    m.head.weight.requires_grad_(False)
    assert count_params(m) == base - m.head.weight.numel()


def test_eval_mode_is_deterministic_train_mode_is_not():
    m, x = _model(dropout=0.5), torch.randn(4, 12, 5)
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


# --- an order-only task: the default model learns it, a bag of steps cannot ----------------------


def _order_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two events (a spike on channel 0, one on channel 1) at random steps; class = which comes first.

    Every series holds the same multiset of steps whatever its class, so only order tells them apart.
    """
    rng = np.random.default_rng(seed)
    t = 16
    x = rng.normal(0, 0.3, (n, t, 3)).astype(np.float32)
    y = rng.integers(0, 2, n)
    for i in range(n):
        a, b = sorted(rng.choice(t, 2, replace=False))
        first, second = (0, 1) if y[i] == 0 else (1, 0)
        x[i, a, first] += 3.0
        x[i, b, second] += 3.0
    return torch.from_numpy(x), torch.from_numpy(y)


def _fit(hp: Hyperparams) -> float:
    xtr, ytr = _order_task(600, 0)
    xva, yva = _order_task(200, 1)
    xte, yte = _order_task(300, 2)
    data = TaskData(xtr, ytr, xva, yva, xte, yte, mean=np.zeros(3, np.float32), std=np.ones(3, np.float32),
                    n_classes=2)
    cfg = TrainConfig(epochs=8, early_stopping_patience=0, device="cpu", warmup_epochs=0.5)
    result = train_and_evaluate(data, hp, cfg, seed=0)
    return evaluate(result.model, data.x_test, data.y_test, 512)[1]


def test_order_only_task_is_learned_by_the_default_model_not_by_a_bag_of_steps():
    small = dict(hidden_dim=32, n_layers=1, n_heads=4, lr=2e-3, batch_size=32)
    assert _fit(Hyperparams(**small)) >= 0.9
    bag = Hyperparams(**small, pos_encoding="none", conv_stem=0, patch_len=1, pooling="mean")
    assert _fit(bag) <= 0.65


# --- the knobs as study parameters ------------------------------------------------------------------


def _parse(**sections) -> config.StudyConfig:
    return config.parse({"study": {"name": "m"}, **sections})


def test_model_knobs_are_study_parameters_with_string_and_bool_choices():
    cfg = _parse(baseline={"pos_encoding": "rotary", "pooling": "cls", "instance_norm": True, "patch_len": 2},
                 space={"pos_encoding": {"choices": ["rotary", "sinusoidal"]}, "pooling": {"choices": ["cls", "mean"]},
                        "instance_norm": {"choices": [True, False]}, "patch_len": {"choices": [1, 2, 4]},
                        "conv_stem": {"low": 0, "high": 3}})
    assert cfg.baseline.pos_encoding == "rotary" and cfg.baseline.instance_norm is True
    assert [p.name for p in cfg.space] == ["pos_encoding", "pooling", "instance_norm", "patch_len", "conv_stem"]
    again = config.from_dict(cfg.to_dict())
    assert (again.baseline, again.space) == (cfg.baseline, cfg.space)


@pytest.mark.parametrize("sections, message", [
    ({"baseline": {"pooling": "median"}}, r"baseline\.pooling: 'median' is not one of mean, cls, last, max"),
    ({"space": {"pos_encoding": {"choices": ["sinusoidal", "alibi"]}}}, r"space\.pos_encoding: 'alibi' is not one of"),
    ({"space": {"pooling": {"low": 0, "high": 1}}}, r"space\.pooling: must be a table of choices"),
    ({"space": {"instance_norm": {"choices": [1, 0]}}}, r"space\.instance_norm\.choices: must be true or false"),
    ({"baseline": {"conv_stem": 4}}, r"baseline\.conv_stem: must be in 0\.\.3, got 4"),
    ({"space": {"conv_stem": {"low": 0, "high": 5}}}, r"space\.conv_stem: must be in 0\.\.3, got 5"),
    ({"baseline": {"patch_len": 32}}, r"baseline\.patch_len: 32 is longer than the sequences \(16 steps\)"),
    ({"space": {"patch_len": {"choices": [1, 64]}}}, r"space\.patch_len: 64 is longer than the sequences"),
])
def test_bad_model_knobs_are_config_errors_naming_the_key(sections, message):
    with pytest.raises(ConfigError, match=message):
        _parse(**sections)


def test_patch_len_longer_than_a_data_file_is_one_line_exit_2_and_nothing_written(tmp_path: Path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "short.npz", X=rng.normal(size=(40, 6, 2)).astype(np.float32), y=np.arange(40) % 2)
    study = tmp_path / "s.toml"
    study.write_text('[study]\nname = "s"\n[data]\nsource = "short.npz"\n[baseline]\npatch_len = 8\n')
    assert cli.main(["run", str(study)]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # before anything else
    err = out.err.strip()
    assert "baseline.patch_len: 8 is longer than the sequences (6 steps)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.db").exists()


def test_default_hyperparams_build_on_any_length():
    for t in (4, 16, 150, 1460):
        m = TransformerClassifier(n_features=1, n_classes=2, seq_len=t, hidden_dim=Hyperparams().hidden_dim,
                                  n_layers=1, n_heads=4, dropout=0.0, patch_len=Hyperparams().patch_len)
        assert min(t, 16) <= m.n_tokens < 32
    assert DataConfig().seq_len >= Hyperparams().patch_len
