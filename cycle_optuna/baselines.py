"""Reference baselines on a study's own split: majority class, 1-NN (Euclidean), an MLP on summary features.

Each is fitted on the training split, scored on the validation and test splits (under [data] folds,
cross-validated as the transformer is: see _cross_validated), and stored once on
the study (user attr ``cycle_optuna_baselines``) so that every result can be read beside them.
They see the same normalised series as the transformer; missing steps (NaN) count as 0, the
training mean. Everything is seeded: the same split gives the same figures on any machine.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from cycle_optuna.data import TaskData
from cycle_optuna.references import BASELINES_ATTR, LABELS, best_reference, compare  # noqa: F401 - re-exported

N_SEGMENTS = 8  # piecewise means per channel: the coarse shape of a series
N_FREQS = 8  # lowest non-constant Fourier magnitudes per channel
MAX_LAG = 2  # cross-channel correlations at lags -2..2
MAX_PAIR_CHANNELS = 16  # above this many channels the pairwise correlations are left out (F^2 features)
MLP_HIDDEN = 128
MLP_EPOCHS = 150
MLP_PATIENCE = 20  # epochs without a better validation loss before the MLP stops
MLP_BATCH = 128


def compute(data: TaskData, *, seed: int) -> dict[str, dict[str, Any]]:
    """Every reference baseline on `data`'s split: {key: {label, val_accuracy, test_accuracy}}.

    Runs on one thread: a model this small gains nothing from more (and loses much on a busy
    machine), and the figures then do not depend on how many threads a worker was given.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if data.n_folds > 1:
            return _cross_validated(data, seed=seed)
        return {
            "majority": _entry("majority", *majority_class(data)),
            "1nn": _entry("1nn", *nearest_neighbour(data)),
            "mlp": _entry("mlp", *summary_mlp(data, seed=seed)),
        }
    finally:
        torch.set_num_threads(threads)


def _cross_validated(data: TaskData, *, seed: int) -> dict[str, dict[str, Any]]:
    """The baselines under the study's cross-validation, as the transformer is scored.

    Val accuracy: over every pooled series, each predicted by the baseline fitted on the other
    folds. Test accuracy: majority class and 1-NN fitted on all the pooled series; the MLP as the
    transformer's model, its folds' fits with their class probabilities averaged.
    """
    views = data.cv_views()
    x, y = data.pooled()
    whole = dataclasses.replace(data, x_train=x, y_train=y, x_val=x[:0], y_val=y[:0], fold_ids=None)
    n = len(y)

    def pooled(accs: list[float]) -> float:
        return sum(len(v.y_val) * a for v, a in zip(views, accs)) / n

    mlps = [_fit_mlp(v, seed=seed + j) for j, v in enumerate(views)]
    proba = torch.stack([p for _, p in mlps]).mean(0)
    mlp_test = _accuracy(proba.argmax(1).numpy(), data.y_test) if len(data.y_test) else math.nan
    return {
        "majority": _entry("majority", pooled([majority_class(v)[0] for v in views]), majority_class(whole)[1]),
        "1nn": _entry("1nn", pooled([nearest_neighbour(v)[0] for v in views]), nearest_neighbour(whole)[1]),
        "mlp": _entry("mlp", pooled([_accuracy(pred, v.y_val) for v, (pred, _) in zip(views, mlps)]), mlp_test),
    }


def _entry(key: str, val: float, test: float) -> dict[str, Any]:
    return {"label": LABELS[key], "val_accuracy": round(float(val), 6),
            "test_accuracy": None if math.isnan(test) else round(float(test), 6)}


def _accuracy(pred: np.ndarray, y: torch.Tensor) -> float:
    return float((pred == y.numpy()).mean()) if len(y) else math.nan


def majority_class(data: TaskData) -> tuple[float, float]:
    """(val, test) accuracy of always answering the most frequent training class."""
    top = int(torch.bincount(data.y_train, minlength=data.n_classes).argmax())
    return (_accuracy(np.full(len(data.y_val), top), data.y_val),
            _accuracy(np.full(len(data.y_test), top), data.y_test))


def _flat(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x.double(), nan=0.0).flatten(1)


def nearest_neighbour(data: TaskData, *, chunk: int = 1024) -> tuple[float, float]:
    """(val, test) accuracy of 1-NN with Euclidean distance on the normalised series."""
    ref = _flat(data.x_train)
    ref_sq = (ref * ref).sum(1)
    labels = data.y_train.numpy()

    def predict(x: torch.Tensor) -> np.ndarray:
        q = _flat(x)
        out = []
        for i in range(0, len(q), chunk):  # bounded memory: [chunk, N_train] distances at a time
            part = q[i:i + chunk]
            d = ref_sq[None, :] - 2 * part @ ref.T  # + |q|^2, the same for every reference
            out.append(labels[d.argmin(1).numpy()])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    return _accuracy(predict(data.x_val), data.y_val), _accuracy(predict(data.x_test), data.y_test)


def summary_features(x: torch.Tensor) -> torch.Tensor:
    """Per-series features [N, D] of normalised series [N, T, F], NaN-safe (NaN = missing step).

    Per channel: mean, std, min, max, first and last observed value, linear slope, mean and std of
    the step-to-step change, lag-1 autocorrelation, positions of the max and min, observed fraction,
    ``N_SEGMENTS`` segment means and ``N_FREQS`` Fourier magnitudes; between channels (up to
    ``MAX_PAIR_CHANNELS``): correlations at lags -MAX_LAG..MAX_LAG.
    """
    x = x.double()
    n, t, f = x.shape
    obs = ~torch.isnan(x)
    cnt = obs.sum(1).clamp(min=1)
    z = torch.where(obs, x, torch.zeros((), dtype=x.dtype))
    mean = z.sum(1) / cnt
    dev = torch.where(obs, x - mean[:, None], torch.zeros((), dtype=x.dtype))
    std = (dev.pow(2).sum(1) / cnt).sqrt()
    inf = torch.tensor(math.inf, dtype=x.dtype)
    mx = torch.where(obs, x, -inf).amax(1)
    mn = torch.where(obs, x, inf).amin(1)
    steps = torch.arange(t, dtype=x.dtype)[None, :, None].expand(n, t, f)
    pos = torch.where(obs, steps, torch.full((), float(t), dtype=x.dtype))
    first_i = pos.amin(1).long().clamp(max=t - 1)
    last_i = torch.where(obs, steps, torch.full((), -1.0, dtype=x.dtype)).amax(1).long().clamp(min=0)
    first = z.gather(1, first_i[:, None]).squeeze(1)
    last = z.gather(1, last_i[:, None]).squeeze(1)
    tt = torch.where(obs, steps / max(1, t - 1), torch.zeros((), dtype=x.dtype))
    t_mean = tt.sum(1) / cnt
    t_dev = torch.where(obs, tt - t_mean[:, None], torch.zeros((), dtype=x.dtype))
    slope = (t_dev * dev).sum(1) / t_dev.pow(2).sum(1).clamp(min=1e-12)
    both = obs[:, 1:] & obs[:, :-1]
    nb = both.sum(1).clamp(min=1)
    diff = torch.where(both, z[:, 1:] - z[:, :-1], torch.zeros((), dtype=x.dtype))
    d_mean = diff.abs().sum(1) / nb
    d_std = ((diff.pow(2).sum(1) / nb) - (diff.sum(1) / nb).pow(2)).clamp(min=0).sqrt()
    ac1 = (torch.where(both, dev[:, 1:] * dev[:, :-1], torch.zeros((), dtype=x.dtype)).sum(1) / nb) \
        / std.pow(2).clamp(min=1e-12)
    argmax = torch.where(obs & (x == mx[:, None]), steps, torch.full((), float(t), dtype=x.dtype)).amin(1) / t
    argmin = torch.where(obs & (x == mn[:, None]), steps, torch.full((), float(t), dtype=x.dtype)).amin(1) / t
    frac = obs.sum(1).to(x.dtype) / t
    segs = []
    for idx in np.array_split(np.arange(t), min(N_SEGMENTS, t)):
        seg_obs = obs[:, idx]
        segs.append(z[:, idx].sum(1) / seg_obs.sum(1).clamp(min=1))
    spec = torch.fft.rfft(z, dim=1).abs()[:, 1:N_FREQS + 1] / math.sqrt(t)  # [N, <=N_FREQS, F]
    feats = [mean, std, mn, mx, first, last, slope, d_mean, d_std, ac1, argmax, argmin, frac, *segs,
             spec.reshape(n, -1)]
    if 2 <= f <= MAX_PAIR_CHANNELS:
        zs = dev / std[:, None].clamp(min=1e-12)
        iu = torch.triu_indices(f, f, offset=1)
        for lag in range(-MAX_LAG, MAX_LAG + 1):
            if abs(lag) >= t:
                continue
            a, b = (zs[:, :t - lag], zs[:, lag:]) if lag >= 0 else (zs[:, -lag:], zs[:, :t + lag])
            c = torch.einsum("ntf,ntg->nfg", a, b) / cnt.min(1).values[:, None, None]
            feats.append(c[:, iu[0], iu[1]])
    out = torch.cat([v.reshape(n, -1) for v in feats], dim=1)
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).float()


def summary_mlp(data: TaskData, *, seed: int) -> tuple[float, float]:
    """(val, test) accuracy of a one-hidden-layer MLP on summary features, best epoch by val loss."""
    pred_va, proba_te = _fit_mlp(data, seed=seed)
    return _accuracy(pred_va, data.y_val), _accuracy(proba_te.argmax(1).numpy(), data.y_test)


def _fit_mlp(data: TaskData, *, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """The summary-feature MLP's validation predictions and test class probabilities."""
    f_tr, f_va, f_te = (summary_features(x) for x in (data.x_train, data.x_val, data.x_test))
    mu, sd = f_tr.mean(0), f_tr.std(0, unbiased=False)
    sd = torch.where(sd < 1e-6, torch.ones_like(sd), sd)
    f_tr, f_va, f_te = ((v - mu) / sd for v in (f_tr, f_va, f_te))
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's generator
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(f_tr.shape[1], MLP_HIDDEN), nn.ReLU(), nn.Dropout(0.2),
                            nn.Linear(MLP_HIDDEN, data.n_classes))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
        loss_fn = nn.CrossEntropyLoss()
        best, best_state, bad = math.inf, None, 0
        for _ in range(MLP_EPOCHS):
            net.train()
            order = torch.randperm(len(f_tr))
            for i in range(0, len(order), MLP_BATCH):
                idx = order[i:i + MLP_BATCH]
                opt.zero_grad()
                loss_fn(net(f_tr[idx]), data.y_train[idx]).backward()
                opt.step()
            net.eval()
            with torch.inference_mode():
                val_loss = float(loss_fn(net(f_va), data.y_val)) if len(f_va) else 0.0
            if val_loss < best - 1e-4:
                best, best_state, bad = val_loss, {k: v.clone() for k, v in net.state_dict().items()}, 0
            else:
                bad += 1
                if bad >= MLP_PATIENCE:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()
        with torch.inference_mode():
            pred_va = net(f_va).argmax(1).numpy() if len(f_va) else np.zeros(0, dtype=np.int64)
            proba_te = torch.softmax(net(f_te), 1) if len(f_te) else torch.zeros(0, data.n_classes)
    return pred_va, proba_te
