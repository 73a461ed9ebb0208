"""Tasks: the built-in synthetic task, .npz/.csv loaders, stratified splits, normalisation stats.

File formats
------------
``.npz``: arrays ``X`` (numeric, [N, T, F]: N sequences of T steps with F features) and ``y``
(integer class labels 0..K-1, [N]). Float labels are accepted when every value is integral.

``.csv``: long format, one row per time step, with a header row. Column ``data.sample_column``
holds the sequence id: rows sharing an id form one sequence, in file order (sequences are ordered
by the first appearance of their id). Column ``data.label_column`` holds the sequence's class
(an integer 0..K-1, constant within a sequence). Every other column is a numeric feature. Every
sequence must have the same number of rows.

Both formats: K is inferred from the labels, every class 0..K-1 must occur, values must be finite.
The split is stratified and depends only on the labels and the seed, and the normalisation
statistics are computed on the training split only, so validation and test rows never leak.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cycle_optuna.config import DataConfig
from cycle_optuna.errors import DataError

# Synthetic task constants (see docs/task.md); tuned so that the default task is learnable but
# clearly below the Bayes rate for the default transformer.
SIGNAL_AMP = 0.8  # std of the class oscillation on each informative channel
TREND_AMP = 1.0  # std of the class-patterned linear trend (end-to-end swing / 2)
AR_COEF = 0.6  # lag-1 autocorrelation of the channel noise
_STD_FLOOR = 1e-6


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on tensors is ambiguous; compare by identity
class TaskData:
    """Normalised train/val/test tensors plus the train-split statistics used to normalise them."""

    x_train: torch.Tensor  # float32 [N, T, F]
    y_train: torch.Tensor  # int64 [N]
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: np.ndarray  # float32 [F], train split only
    std: np.ndarray  # float32 [F], train split only, tiny stds floored to 1
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[2])

    @property
    def seq_len(self) -> int:
        return int(self.x_train.shape[1])

    def stats(self) -> dict[str, Any]:
        """JSON-ready normalisation statistics and shapes (what predict() on new data needs)."""
        return {
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "n_features": self.n_features,
            "seq_len": self.seq_len,
            "n_classes": self.n_classes,
            "n_train": int(self.y_train.shape[0]),
            "n_val": int(self.y_val.shape[0]),
            "n_test": int(self.y_test.shape[0]),
        }


# ---------------------------------------------------------------------------------------------
# Synthetic task


def n_informative(n_features: int) -> int:
    """How many channels carry the class signal; the rest are distractors."""
    return min(n_features, max(2, n_features // 2))


def class_loadings(cfg: DataConfig) -> np.ndarray:
    """Per-class linear map from the latents (a, b, s) to the informative channels: [K, T*I, 3].

    Class c oscillates at ``2 + c // 2`` cycles per sequence; even classes move all informative
    channels in phase, odd classes as a travelling wave (each channel a quarter period behind the
    previous). Latent ``s`` is a linear trend whose per-channel signs follow a class pattern, so
    only the relation between channels tells the classes with the same frequency apart.
    """
    T, n_inf, K = cfg.seq_len, n_informative(cfg.n_features), cfg.n_classes
    t = np.arange(T, dtype=np.float64)
    ramp = t / (T - 1) - 0.5
    out = np.zeros((K, T, n_inf, 3))
    for c in range(K):
        omega = 2 * np.pi * (2 + c // 2) / T
        signs = _trend_signs(c, n_inf)
        for j in range(n_inf):
            phase = 0.0 if c % 2 == 0 else j * np.pi / 2
            out[c, :, j, 0] = SIGNAL_AMP * np.cos(omega * t + phase)
            out[c, :, j, 1] = SIGNAL_AMP * np.sin(omega * t + phase)
            out[c, :, j, 2] = 2 * TREND_AMP * signs[j] * ramp
    return out.reshape(K, T * n_inf, 3)


def _trend_signs(c: int, n_inf: int) -> np.ndarray:
    # Walsh patterns: class 0 trends all channels together, class 1 alternates, class 2 pairs, ...
    return np.array([(-1.0) ** bin(j & c).count("1") for j in range(n_inf)])


def ar_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Stationary AR(1) noise along axis 1 with marginal std ``scale``."""
    eps = rng.standard_normal(shape)
    out = np.empty(shape)
    out[:, 0] = eps[:, 0]
    k = math.sqrt(1 - AR_COEF**2)
    for i in range(1, shape[1]):
        out[:, i] = AR_COEF * out[:, i - 1] + k * eps[:, i]
    return scale * out


def make_synthetic(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw synthetic task: X float32 [N, T, F], y int64 [N]; deterministic in (cfg, seed).

    Each sequence's hidden regime (its class) sets the frequency, cross-channel phase and trend
    pattern of the informative channels; distractor channels carry look-alike oscillations and
    trends at random frequencies; every channel gets AR(1) noise of std ``cfg.noise``.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    N, T, F, K = cfg.n_samples, cfg.seq_len, cfg.n_features, cfg.n_classes
    n_inf = n_informative(F)
    y = rng.permutation(np.arange(N) % K).astype(np.int64)
    z = rng.standard_normal((N, 3))
    L = class_loadings(cfg)  # [K, T*I, 3]
    informative = np.einsum("npk,nk->np", L[y], z).reshape(N, T, n_inf)
    x = ar_noise(rng, (N, T, F), cfg.noise)
    x[:, :, :n_inf] += informative
    n_dis = F - n_inf
    if n_dis:
        t = np.arange(T)[None, :, None]
        freq = rng.uniform(1.5, 3.5, (N, 1, n_dis))
        phase = rng.uniform(0, 2 * np.pi, (N, 1, n_dis))
        amp = SIGNAL_AMP * np.sqrt(rng.chisquare(2, (N, 1, n_dis)))  # same amplitude law as (a, b)
        slope = 2 * TREND_AMP * rng.standard_normal((N, 1, n_dis))
        x[:, :, n_inf:] += amp * np.cos(2 * np.pi * freq * t / T + phase) + slope * (t / (T - 1) - 0.5)
    return x.astype(np.float32), y


def class_covariances(cfg: DataConfig) -> np.ndarray:
    """Exact covariance of the informative channels given each class: [K, T*I, T*I]."""
    L = class_loadings(cfg)
    T, n_inf = cfg.seq_len, n_informative(cfg.n_features)
    lag = np.abs(np.subtract.outer(np.arange(T), np.arange(T)))
    noise = cfg.noise**2 * np.kron(AR_COEF**lag, np.eye(n_inf))
    return np.einsum("kpi,kqi->kpq", L, L) + noise + 1e-9 * np.eye(T * n_inf)


def bayes_predict(cfg: DataConfig, x_raw: np.ndarray) -> np.ndarray:
    """The Bayes-optimal (oracle) class for raw synthetic sequences [N, T, F].

    Given the class, the informative channels are zero-mean Gaussian with a known covariance and
    the distractors are independent of the class, so the exact posterior is a Gaussian likelihood
    ratio (classes are balanced).
    """
    n_inf = n_informative(cfg.n_features)
    v = x_raw[:, :, :n_inf].reshape(len(x_raw), -1).astype(np.float64)
    scores = []
    for cov in class_covariances(cfg):
        chol = np.linalg.cholesky(cov)
        sol = np.linalg.solve(chol, v.T)
        scores.append(-0.5 * (sol**2).sum(0) - np.log(np.diag(chol)).sum())
    return np.argmax(np.stack(scores, 1), axis=1)


# ---------------------------------------------------------------------------------------------
# Files


def _fail(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}")


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Raw X, y from an .npz file holding arrays ``X`` and ``y``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("X", "y") if k not in f.files]
            if missing:
                raise _fail(path, f"missing array(s) {', '.join(missing)} (found: {', '.join(f.files) or 'none'}); "
                            "expected X [N, T, F] and y [N]")
            x, y = f["X"], f["y"]
    except DataError:
        raise
    except FileNotFoundError:
        raise _fail(path, "data file not found") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise _fail(path, f"not a readable .npz file ({e})") from e
    return x, y


def load_csv(path: Path, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Raw X, y from a long-format .csv file (see the module docstring)."""
    try:
        f = open(path, newline="")
    except FileNotFoundError:
        raise _fail(path, "data file not found") from None
    except OSError as e:
        raise _fail(path, f"cannot read data file: {e.strerror}") from e
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise _fail(path, "empty csv file (expected a header row)")
        header = [h.strip() for h in header]
        for col, key in ((cfg.sample_column, "sample_column"), (cfg.label_column, "label_column")):
            if col not in header:
                raise _fail(path, f"missing {key} column '{col}' (columns: {', '.join(header)})")
        i_sample, i_label = header.index(cfg.sample_column), header.index(cfg.label_column)
        feat_idx = [i for i in range(len(header)) if i not in (i_sample, i_label)]
        if not feat_idx:
            raise _fail(path, "no feature columns besides the sample and label columns")
        seqs: dict[str, list[list[float]]] = {}
        labels: dict[str, float] = {}
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise _fail(path, f"line {line}: {len(row)} fields, the header has {len(header)}")
            sid = row[i_sample].strip()
            try:
                label = float(row[i_label])
            except ValueError:
                raise _fail(path, f"line {line}: label {row[i_label]!r} is not a number") from None
            if sid in labels and labels[sid] != label:
                raise _fail(path, f"line {line}: sample {sid!r} changes label from {labels[sid]:g} to {label:g}; "
                            "the label must be constant within a sequence")
            labels[sid] = label
            try:
                seqs.setdefault(sid, []).append([float(row[i]) for i in feat_idx])
            except ValueError:
                bad = next(i for i in feat_idx if not _is_float(row[i]))
                raise _fail(path, f"line {line}: column '{header[bad]}' value {row[bad]!r} is not a number") from None
    if not seqs:
        raise _fail(path, "no data rows")
    lengths = {len(s) for s in seqs.values()}
    if len(lengths) > 1:
        counts = {sid: len(s) for sid, s in seqs.items()}
        short = min(counts, key=counts.get)
        long = max(counts, key=counts.get)
        raise _fail(path, f"ragged sequences: every sample needs the same number of rows, but sample {short!r} "
                    f"has {counts[short]} and sample {long!r} has {counts[long]}")
    x = np.asarray(list(seqs.values()), dtype=np.float64)
    y = np.asarray([labels[sid] for sid in seqs])
    return x, y


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def check_arrays(path: Path | str, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate raw arrays; return X float32, y int64 and the number of classes."""
    path = Path(path)
    x, y = np.asarray(x), np.asarray(y)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise _fail(path, f"X must be numeric, got dtype {x.dtype}")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise _fail(path, f"y must hold integer labels, got dtype {y.dtype}")
    if x.ndim != 3:
        raise _fail(path, f"X must be 3-D [N, T, F], got shape {list(x.shape)}")
    if y.ndim != 1 or len(y) != len(x):
        raise _fail(path, f"y must be 1-D with len N={len(x)}, got shape {list(y.shape)}")
    if min(x.shape) == 0:
        raise _fail(path, f"X is empty, shape {list(x.shape)}")
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise _fail(path, f"X has {int((~np.isfinite(x)).sum())} NaN/inf values (first at sample {bad[0]}, "
                    f"step {bad[1]}, feature {bad[2]})")
    if not np.isfinite(y).all():
        raise _fail(path, "y has NaN/inf labels")
    if (y != np.round(y)).any():
        raise _fail(path, f"labels must be integers 0..K-1, got {y[y != np.round(y)][0]!r}")
    if (y < 0).any():
        raise _fail(path, f"labels must be integers 0..K-1, got negative label {int(y.min())}")
    y = y.astype(np.int64)
    present = np.unique(y)
    if len(present) < 2:
        raise _fail(path, f"only one class ({int(present[0])}); classification needs at least two")
    k = int(y.max()) + 1
    missing = sorted(set(range(k)) - set(present.tolist()))
    if missing:
        raise _fail(path, f"labels must be 0..K-1 with every class present: labels go up to {k - 1} but "
                    f"class(es) {missing} have no samples")
    return x.astype(np.float32), y, k


# ---------------------------------------------------------------------------------------------
# Split and normalisation


def stratified_split(path: Path | str, y: np.ndarray, n_classes: int, val_fraction: float, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test indices; each class split in the same proportions; depends only on y and seed."""
    rng = np.random.default_rng([seed, 0x5B17])
    parts: tuple[list, list, list] = ([], [], [])
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = len(idx)
        n_val, n_test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
        if n - n_val - n_test < 1:
            raise _fail(Path(path), f"class {c} has {n} sample(s), too few to split with val_fraction={val_fraction} "
                        f"and test_fraction={test_fraction} (each split needs at least one per class)")
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val:n_val + n_test])
        parts[0].append(idx[n_val + n_test:])
    return tuple(rng.permutation(np.concatenate(p)) for p in parts)  # type: ignore[return-value]


def normalise(x: np.ndarray | torch.Tensor, mean: Any, std: Any) -> np.ndarray | torch.Tensor:
    """(x - mean) / std over the last (feature) axis; float32, same kind as x."""
    if isinstance(x, torch.Tensor):
        m = torch.as_tensor(np.asarray(mean, dtype=np.float32), device=x.device)
        s = torch.as_tensor(np.asarray(std, dtype=np.float32), device=x.device)
        return (x.float() - m) / s
    return ((np.asarray(x, dtype=np.float32) - np.asarray(mean, dtype=np.float32))
            / np.asarray(std, dtype=np.float32)).astype(np.float32)


def train_stats(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over samples and steps of the training split."""
    flat = x_train.reshape(-1, x_train.shape[-1]).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)
    std = np.where(std < _STD_FLOOR, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def load_task(cfg: DataConfig, seed: int, *, data_path: Path | None = None) -> TaskData:
    """The task's normalised splits: the synthetic task when ``data_path`` is None, else a .npz/.csv file."""
    if data_path is None:
        where: Path | str = "<synthetic task>"
        x, y = make_synthetic(cfg, seed)
        k = cfg.n_classes
    else:
        where = data_path = Path(data_path)
        suffix = data_path.suffix.lower()
        if suffix == ".npz":
            x, y = load_npz(data_path)
        elif suffix == ".csv":
            x, y = load_csv(data_path, cfg)
        else:
            raise _fail(data_path, "unsupported data file type (expected .npz or .csv)")
        x, y, k = check_arrays(data_path, x, y)
    tr, va, te = stratified_split(where, y, k, cfg.val_fraction, cfg.test_fraction, seed)
    mean, std = train_stats(x[tr])

    def split(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(normalise(x[idx], mean, std)), torch.from_numpy(y[idx])

    (xtr, ytr), (xva, yva), (xte, yte) = split(tr), split(va), split(te)
    return TaskData(xtr, ytr, xva, yva, xte, yte, mean=mean, std=std, n_classes=k)
