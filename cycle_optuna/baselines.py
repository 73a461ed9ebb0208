"""Reference baselines on a study's own split: majority class, 1-NN (Euclidean) on the normalised series
and on each series z-normalised on its own, an MLP on summary features.

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
from cycle_optuna.features import summary_features, z_normalise
from cycle_optuna.references import BASELINES_ATTR, LABELS, best_reference, compare  # noqa: F401 - re-exported

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
        pred_va, proba_te = _fit_mlp(data, seed=seed)
        preds = {"majority": _majority_predictions(data), "1nn": _nn_predictions(data),
                 "1nn_z": _nn_predictions(data, per_series=True), "mlp": (pred_va, proba_te.argmax(1).numpy())}
        return {key: _entry(key, _accuracy(va, data.y_val), _accuracy(te, data.y_test), _balanced(te, data.y_test))
                for key, (va, te) in preds.items()}
    finally:
        torch.set_num_threads(threads)


def nn_work(data: TaskData) -> tuple[int, int, int]:
    """(series compared, reference series, values per series) of the 1-NN baselines, each run twice
    (as is and z-normalised): their cost grows with the product, the rest of `compute` is small."""
    n_train, n_val, n_test = len(data.y_train), len(data.y_val), len(data.y_test)
    values = int(data.x_train.shape[1] * data.x_train.shape[2]) if data.x_train.dim() == 3 else 0
    if data.n_folds > 1:  # each fold's pooled series against the others, then the test series against all
        pooled = n_train + n_val
        return pooled + n_test, pooled, values
    return n_val + n_test, n_train, values


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
    test_preds = {"majority": _majority_predictions(whole)[1], "1nn": _nn_predictions(whole)[1],
                  "1nn_z": _nn_predictions(whole, per_series=True)[1],
                  "mlp": proba.argmax(1).numpy() if len(data.y_test) else np.zeros(0, dtype=np.int64)}
    # each fold's majority and 1-NNs answer its validation series only: the test series are scored
    # once, by `whole` above (each fold scored all of them again, k times the test set's 1-NN work, unused)
    folds = [dataclasses.replace(v, x_test=v.x_test[:0], y_test=v.y_test[:0]) for v in views]
    vals = {"majority": pooled([majority_class(v)[0] for v in folds]),
            "1nn": pooled([nearest_neighbour(v)[0] for v in folds]),
            "1nn_z": pooled([nearest_neighbour(v, per_series=True)[0] for v in folds]),
            "mlp": pooled([_accuracy(pred, v.y_val) for v, (pred, _) in zip(views, mlps)])}
    return {key: _entry(key, vals[key], _accuracy(test_preds[key], data.y_test), _balanced(test_preds[key], data.y_test))
            for key in vals}


def _entry(key: str, val: float, test: float, test_balanced: float = math.nan) -> dict[str, Any]:
    return {"label": LABELS[key], "val_accuracy": round(float(val), 6),
            "test_accuracy": None if math.isnan(test) else round(float(test), 6),
            # the mean recall over the test split's classes: on imbalanced classes accuracy alone
            # lets "always the majority" look good
            "test_balanced_accuracy": None if math.isnan(test_balanced) else round(float(test_balanced), 6)}


def _accuracy(pred: np.ndarray, y: torch.Tensor) -> float:
    return float((pred == y.numpy()).mean()) if len(y) else math.nan


def _balanced(pred: np.ndarray, y: torch.Tensor) -> float:
    """Mean recall over the classes present in `y` (as the tuned model's balanced accuracy)."""
    labels = y.numpy()
    recalls = [float((pred[labels == k] == k).mean()) for k in np.unique(labels)]
    return float(np.mean(recalls)) if recalls else math.nan


def _majority_predictions(data: TaskData) -> tuple[np.ndarray, np.ndarray]:
    top = int(torch.bincount(data.y_train, minlength=data.n_classes).argmax())
    return np.full(len(data.y_val), top), np.full(len(data.y_test), top)


def majority_class(data: TaskData) -> tuple[float, float]:
    """(val, test) accuracy of always answering the most frequent training class."""
    pred_va, pred_te = _majority_predictions(data)
    return _accuracy(pred_va, data.y_val), _accuracy(pred_te, data.y_test)


def _flat(x: torch.Tensor, per_series: bool = False) -> torch.Tensor:
    x = x.double()
    if per_series:
        x = z_normalise(x)
    return torch.nan_to_num(x, nan=0.0).flatten(1)


def nearest_neighbour(data: TaskData, *, chunk: int = 1024, per_series: bool = False) -> tuple[float, float]:
    """(val, test) accuracy of 1-NN with Euclidean distance on the normalised series, or with
    `per_series` on each series z-normalised on its own (z_normalise)."""
    pred_va, pred_te = _nn_predictions(data, chunk=chunk, per_series=per_series)
    return _accuracy(pred_va, data.y_val), _accuracy(pred_te, data.y_test)


def _nn_predictions(data: TaskData, *, chunk: int = 1024, per_series: bool = False) -> tuple[np.ndarray, np.ndarray]:
    ref = _flat(data.x_train, per_series)
    ref_sq = (ref * ref).sum(1)
    labels = data.y_train.numpy()

    def predict(x: torch.Tensor) -> np.ndarray:
        q = _flat(x, per_series)
        out = []
        for i in range(0, len(q), chunk):  # bounded memory: [chunk, N_train] distances at a time
            part = q[i:i + chunk]
            d = ref_sq[None, :] - 2 * part @ ref.T  # + |q|^2, the same for every reference
            out.append(labels[d.argmin(1).numpy()])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    return predict(data.x_val), predict(data.x_test)


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
