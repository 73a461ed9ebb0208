"""The transformer classifier."""

from __future__ import annotations

import pytest
import torch

from cycle_optuna.model import TransformerClassifier, count_params

BASE = dict(n_features=5, n_classes=3, seq_len=12, hidden_dim=16, n_layers=2, n_heads=4, dropout=0.1)


def _model(**kw) -> TransformerClassifier:
    torch.manual_seed(0)
    return TransformerClassifier(**{**BASE, **kw})


def test_output_shape():
    logits = _model()(torch.randn(7, 12, 5))
    assert logits.shape == (7, 3)
    assert torch.isfinite(logits).all()


def test_shorter_sequences_are_accepted_longer_rejected():
    m = _model()
    assert m(torch.randn(2, 6, 5)).shape == (2, 3)
    with pytest.raises(ValueError, match="t=13"):
        m(torch.randn(2, 13, 5))


def test_param_count_grows_with_capacity():
    base = count_params(_model())
    assert count_params(_model(hidden_dim=32)) > base
    assert count_params(_model(n_layers=3)) > base
    assert count_params(_model(n_heads=2)) == base  # heads split the width, they add no parameters


def test_count_params_ignores_frozen():
    m = _model()
    total = count_params(m)
    m.head.weight.requires_grad_(False)
    assert count_params(m) == total - m.head.weight.numel()


def test_init_gain_scales_linear_weights_and_zeroes_biases():
    small, large = _model(init_gain=0.1), _model(init_gain=1.0)
    ratio = small.blocks[0].qkv.weight.std() / large.blocks[0].qkv.weight.std()
    assert 0.07 < ratio < 0.13
    assert small.embed.weight.abs().max() <= 0.1 * (6 / (5 + 16)) ** 0.5 + 1e-6  # xavier bound x gain
    assert all(torch.count_nonzero(m.bias) == 0 for m in small.modules() if isinstance(m, torch.nn.Linear))


def test_heads_must_divide_hidden():
    with pytest.raises(ValueError, match=r"but got hidden_dim=18, n_heads=4\."):
        _model(hidden_dim=18)


def test_eval_mode_is_deterministic_train_mode_is_not():
    m, x = _model(dropout=0.5), torch.randn(4, 12, 5)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


def test_gradients_reach_every_parameter():
    m = _model()
    m(torch.randn(3, 12, 5)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
