"""Tasks: the built-in synthetic task, .npz/.csv/.ts/.arff/.tsv/.txt loaders, stratified splits, normalisation stats.

File formats (docs/data.md has the details)
------------------------------------------
``.npz``: arrays ``X`` (numeric, [N, T, F]: N sequences of T steps with F features), ``y``
(integer class labels 0..K-1, [N]) and optionally ``lengths`` (int, [N], 1..T): steps of sequence
i from ``lengths[i]`` on are padding. Float labels are accepted when every value is integral.

``.csv``: long format, one row per time step, with a header row. Column ``data.sample_column``
holds the sequence id: rows sharing an id form one sequence, in file order (sequences are ordered
by the first appearance of their id). Column ``data.label_column`` holds the sequence's class
(a name, or an integer; constant within a sequence). Every other column is a numeric feature.
Sequences may differ in length. With ``data.layout = "wide"`` a row is one univariate sequence
instead: the label column its class, the other columns (but an id in ``data.sample_column``) its steps.

``.ts``: the UCR/UEA archive format (univariate or multivariate, equal or unequal length, ``?``
for missing values). ``.arff``: the archive's ARFF files (numeric attributes and a nominal class
last, or one relational attribute holding the dimensions). ``.tsv``/``.txt``: the UCR archive's
tables (no header; a label, then one univariate series a line, tab- or space-separated; trailing
NaN pads).

Class labels of .csv, .ts, .arff, .tsv and .txt files are names, mapped to 0..K-1 in numeric order
when every name is a number, else in the declared order (.ts, .arff) or sorted (.csv, .tsv, .txt);
a test file maps its labels through the training file's names.

Missing data: NaN in X is a missing value (inf is an error). Shorter sequences are padded with NaN
at the end, so a step whose features are all NaN is padding or missing and the model masks it;
after normalisation a NaN in a step that has other observed features is filled with 0 (the
training mean). Every sequence needs at least one observed value.

The split is stratified and depends only on the labels and the seed; with ``data.test_source`` the
test split is that file and validation is carved from the training file only. Normalisation
statistics come from the training split only (NaN ignored), so validation and test rows never leak;
under k-fold cross-validation (``data.folds``, see ``cv_folds``) every train and val series is
trained on by some fold, and the statistics come from both (never from test).
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import difflib
import dataclasses
import io
import math
import re
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from cycle_optuna.config import (AUTO_FOLDS, AUTO_FOLDS_MAX_VAL, AUTO_FOLDS_MIN_VAL_PER_CLASS, DATA_SUFFIXES, FOLDS_AUTO, DataConfig, StudyConfig,
                                 resolve_data_path, resolve_test_path)
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
    mean: np.ndarray  # float64 [F], train split only (train + val under cross-validation)
    std: np.ndarray  # float64 [F], as mean; tiny stds floored to 1
    n_classes: int
    class_names: tuple[str, ...] = ()  # the file's label for each class index; () for the synthetic task
    # k-fold cross-validation: the fold (0..k-1) of each series of x_train then x_val; None: holdout
    fold_ids: torch.Tensor | None = None
    feature_names: tuple[str, ...] = ()  # a long .csv training file's feature columns; () for other data

    @property
    def n_folds(self) -> int:
        """1 when cycles are scored on the validation split, else the cross-validation's k."""
        return 1 if self.fold_ids is None else int(self.fold_ids.max()) + 1

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training and validation series together (what cross-validation splits)."""
        return torch.cat([self.x_train, self.x_val]), torch.cat([self.y_train, self.y_val])

    def largest_training_split(self) -> int:
        """Series the largest training part holds: the training split, or under cross-validation
        the pooled series less the smallest fold (counted, not copied as cv_views does)."""
        if self.fold_ids is None:
            return int(self.y_train.shape[0])
        return int(self.fold_ids.numel() - torch.bincount(self.fold_ids.long()).min())

    def cv_views(self) -> list[TaskData]:
        """Per fold, this task with that fold of the pooled series as validation and the others as training."""
        x, y = self.pooled()
        views = []
        for j in range(self.n_folds):
            va = self.fold_ids == j
            views.append(dataclasses.replace(self, x_train=x[~va], y_train=y[~va], x_val=x[va], y_val=y[va],
                                             fold_ids=None))
        return views

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
            **({"class_names": list(self.class_names)} if self.class_names else {}),
            **({"feature_names": list(self.feature_names)} if self.feature_names else {}),
            "n_train": int(self.y_train.shape[0]),
            "n_val": int(self.y_val.shape[0]),
            "n_test": int(self.y_test.shape[0]),
            "folds": self.n_folds,
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


BAYES_MAX_DIM = 4096  # seq_len x informative channels the oracle takes on: a [K, D, D] covariance and its Cholesky


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


def load_npz(path: Path, *, need_y: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw X, y from an .npz file holding arrays ``X``, ``y`` and optionally ``lengths`` (applied as
    NaN padding); without `need_y`, y is None when the file holds no ``y`` (new data to predict on)."""
    try:
        with open(path, "rb") as head:
            magic = head.read(6)
        if magic == b"\x93NUMPY":  # np.load would return the bare array
            raise _fail(path, "not an .npz file: it holds one .npy array (save X and y with numpy.savez)")
        if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # else np.load reads it as a pickle
            raise _fail(path, "not an .npz file: it is not a zip archive (save X and y with numpy.savez)")
        _check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("X", "y") if k not in f.files and (need_y or k == "X")]
            if missing:
                raise _fail(path, f"missing array(s) {', '.join(missing)} (found: {', '.join(f.files) or 'none'}); "
                            "expected X [N, T, F] and y [N]")
            x, y = f["X"], f["y"] if "y" in f.files else None
            lengths = f["lengths"] if "lengths" in f.files else None
    except DataError:
        raise
    except FileNotFoundError:
        raise _fail(path, "data file not found") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise _fail(path, f"not a readable .npz file ({e})") from e
    except MemoryError as e:  # a header that declares far more data than the file holds, or than memory allows
        raise _fail(path, f"cannot be loaded: {e} (the file holds {path.stat().st_size:,} bytes)") from None
    if lengths is not None:
        x = _apply_lengths(path, x, lengths)
    return x, y


def _check_npz_sizes(path: Path) -> None:
    """Every array of the archive holds the data its header declares: a header may declare any
    shape, and numpy would allocate it (terabytes) before finding the data missing."""
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as m:
                version = np.lib.format.read_magic(m)
                if version not in ((1, 0), (2, 0)):
                    continue  # np.load names it
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(m)
                declared = math.prod(shape) * dtype.itemsize
                held = info.file_size - m.tell()
            if dtype.hasobject or declared <= held:
                continue
            raise _fail(path, f"array {info.filename[:-4]} declares shape {tuple(shape)} ({declared:,} bytes of "
                              f"{dtype}) but holds {max(held, 0):,} bytes: truncated or corrupt")


def _apply_lengths(path: Path, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """X with every step at or beyond its sequence's length set to NaN (padding)."""
    if x.ndim != 3 or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        return x  # check_arrays names the problem with X itself
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or len(lengths) != len(x):
        raise _fail(path, f"lengths must be 1-D with len N={len(x)}, got shape {list(lengths.shape)}")
    if not np.issubdtype(lengths.dtype, np.integer):
        if not np.issubdtype(lengths.dtype, np.floating) or not np.isfinite(lengths).all() \
                or (lengths != np.round(lengths)).any():
            raise _fail(path, f"lengths must hold integers, got dtype {lengths.dtype}")
    t = x.shape[1]
    bad = np.flatnonzero((lengths < 1) | (lengths > t))
    if len(bad):
        i = int(bad[0])
        raise _fail(path, f"lengths[{i}] = {lengths[i]:g} is out of range 1..{t} (the steps of X)")
    x = x.astype(np.float64)
    x[np.arange(t)[None, :] >= lengths.astype(np.int64)[:, None]] = np.nan
    return x


def load_csv(path: Path, cfg: DataConfig, *, need_labels: bool = True, features: tuple[str, ...] | None = None
             ) -> tuple[np.ndarray, list[str] | None, list[str] | None, tuple[str, ...] | None]:
    """Raw X (shorter sequences NaN-padded), each sequence's label name, each sequence's id and the
    feature columns' names (None for a wide file, whose columns are steps) from a .csv file (see the
    module docstring). Without `need_labels` a file without the label column is read with labels
    None (new data to predict on); ids are None for a wide file without a sample column.
    ``features``: the training file's feature columns, by name: a long file's are read in that order
    and must be those (a reordered export would otherwise be read as other features)."""
    text = _read_text(path)
    first = text.partition("\n")[0].rstrip("\r")
    # Excel's "sep=;" first line names the delimiter; the header follows it
    hint = re.fullmatch(r"(?i)sep=([,;\t])", first.strip(" "))
    if hint:
        first = text.partition("\n")[2].partition("\n")[0]
    # a comma-separated file, else what the header row is separated by (spreadsheets in many locales
    # save ';'); a comma inside a quoted column name is not a delimiter
    bare = re.sub(r'"[^"]*"', "", first)
    delimiter = hint.group(1) if hint else "," if "," in bare else max(";\t", key=bare.count)
    # those locales write 1,5 for 1.5, and a ';'-separated cell holds no other comma
    number = (lambda v: v.replace(",", ".")) if delimiter == ";" else (lambda v: v)
    reader = _rows(path, csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    if hint:
        next(reader)  # read, not cut from the text: a quote error's line number stays the file's
    first_row = 3 if hint else 2  # the file's line of the first data row, for messages
    header = next(reader, None)
    if not header or not "".join(header).strip():  # nothing, or only blanks, on the first line
        raise _fail(path, "empty csv file (expected a header row)")
    header = [h.strip() for h in header]
    if not all(header):  # a column without a name: read the rows once to see what it holds
        header, rows = _drop_empty_unnamed(path, header, list(reader))
        reader = iter(rows)
    if dup := next((h for i, h in enumerate(header) if h in header[:i]), None):
        raise _fail(path, f"column {dup!r} appears twice in the header")
    if cfg.layout == "wide":
        return (*_wide_csv(path, cfg, header, reader, number, need_labels, first_row), None)
    for col, key in ((cfg.sample_column, "sample_column"), (cfg.label_column, "label_column")):
        if col not in header and (need_labels or key == "sample_column"):
            hint = _column_hint(header, col, key, need_labels, second=features is not None)
            raise _fail(path, f"missing {key} column '{col}' (columns: {_columns(header)}){hint}")
    i_sample = header.index(cfg.sample_column)
    i_label = header.index(cfg.label_column) if cfg.label_column in header else None
    feat_idx = [i for i in range(len(header)) if i not in (i_sample, i_label)]
    if not feat_idx:
        raise _fail(path, "no feature columns besides the sample and label columns")
    if features is not None:
        feat_idx = _by_name(path, header, feat_idx, features)
    seqs: dict[str, list[list[float]]] = {}
    labels: dict[str, str] = {}
    label_name = _LabelNames(path)
    unlabelled = None  # new data: the first line whose label cell is empty (a label column left blank is no labels)
    for line, row in enumerate(reader, start=first_row):
        if not row:
            continue
        if len(row) != len(header):
            raise _fail(path, f"line {line}: {len(row)} fields, the header has {len(header)}")
        sid = row[i_sample].strip()
        if i_label is not None and not need_labels and row[i_label].strip().lower() in ("", *MISSING):
            unlabelled = unlabelled or line
        elif i_label is not None:
            label = label_name(line, number(row[i_label]))
            if sid in labels and labels[sid] != label:
                raise _fail(path, f"line {line}: sample {sid!r} changes label from {labels[sid]} to {label}; "
                            "the label must be constant within a sequence")
            labels[sid] = label
        try:
            seqs.setdefault(sid, []).append([_csv_float(number(row[i])) for i in feat_idx])
        except ValueError:
            bad = next(i for i in feat_idx if not _is_float(number(row[i])))
            raise _fail(path, f"line {line}: column '{header[bad]}' value {row[bad]!r} is not a number") from None
    if not seqs:
        raise _fail(path, "no data rows")
    if need_labels and len(feat_idx) > 1 and all(len(v) == 1 for v in seqs.values()):
        # a row per series read as a row per step: every "series" would be one step of many features
        raise _fail(path, f"every sample has a single row, so each series would be one time step of "
                    f"{len(feat_idx)} features; if a row is a whole series, set [data] layout = \"wide\"")
    if unlabelled is not None:
        if labels:  # some series labelled, some not: a half-filled column is a mistake, not new data
            raise _fail(path, f"line {unlabelled}: empty label, where other series have theirs: label every series, "
                        "or leave the whole label column empty")
        i_label = None
    x = _pad([np.asarray(s, dtype=np.float64) for s in seqs.values()])
    return x, None if i_label is None else [labels[sid] for sid in seqs], list(seqs), tuple(header[i] for i in feat_idx)


def _by_name(path: Path, header: list[str], feat_idx: list[int], features: tuple[str, ...]) -> list[int]:
    """The columns of `features`, in that order; a file whose feature columns are other ones is refused."""
    have = [header[i] for i in feat_idx]
    if missing := [f for f in features if f not in have]:
        extra = [h for h in have if h not in features]
        hint = "; ".join(f"{c!r} is {f!r}?" for f in missing if (c := _close_name(f, extra)))
        raise _fail(path, f"missing feature column(s) {', '.join(map(repr, missing))}: the study was trained on "
                    f"{_columns(list(features))}" + (f" ({hint} rename it as in the training file)" if hint else ""))
    if extra := [f for f in have if f not in features]:
        raise _fail(path, f"feature column(s) {', '.join(map(repr, extra))} not in the study's training file, "
                    f"which has {_columns(list(features))}; remove them")
    return [header.index(f) for f in features]


def _rows(path: Path, reader: Any) -> Iterator[list[str]]:
    """A csv reader's rows; its error (a quote never closed runs on until the field is over the
    csv module's limit) names the file and how far it read, as one line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise _fail(path, f"cannot read it as csv at line {reader.line_num} ({e}): a quote that is never "
                        "closed?") from None
        yield row


def _drop_empty_unnamed(path: Path, header: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Columns without a header name: one empty in every row (a trailing delimiter) is dropped; one
    with values (a row index, as pandas' to_csv() and R's write.csv write) is refused, since read as a
    feature it would be one, silently, and a row number can give the classes away."""
    unnamed = [i for i, h in enumerate(header) if not h]
    keep = [i for i in range(len(header)) if i not in unnamed]
    for i in unnamed:
        if any(len(r) > i and r[i].strip() for r in rows):
            raise _fail(path, f"column {i + 1} has no name in the header (a row index, as pandas' to_csv() or R's "
                        "write.csv write?); write the file without it (index=False, row.names=FALSE) or name it")
    return [header[i] for i in keep], [[r[i] for i in keep if i < len(r)] if r else r for r in rows]


def _close_name(name: str, names: list[str]) -> str | None:
    """The column of `names` that is `name` in another case, else one spelled nearly like it."""
    return next((h for h in names if h.lower() == name.lower()), None) or next(
        iter(difflib.get_close_matches(name, names, n=1, cutoff=0.8)), None)


def _column_hint(header: list[str], col: str, key: str, need_labels: bool, second: bool = False) -> str:
    """What to do about a missing sample or label column: the column of another case or spelling, the
    key that names another one, or (sample, in a training or test file) the wide layout. `second`: a
    test file read beside a .csv training file, which the key also names: its column is renamed."""
    close = _close_name(col, header)
    if second and need_labels:
        return (f"; did you mean {close!r}? " if close else "; ") + f"name it {col!r}, as in the training file"
    if not need_labels:  # new data for a finished study: the study's column names hold
        return (f"; did you mean {close!r}? name it {col!r}, as in the study's training file" if close else
                f"; new data needs the study's columns: each series' id in a column named {col!r}, a row per time "
                "step ([data] layout = \"long\")")
    if close:
        return f"; did you mean {close!r}? set [data] {key} = {close!r}"
    if key == "label_column":
        return "; set [data] label_column to the column that holds each series' class"
    return ("; set [data] sample_column to the column that holds each series' id (and label_column to its class), "
            "or, for one series per row, [data] layout = \"wide\"")


def _columns(header: list[str], most: int = 12) -> str:
    names = [h if h.isprintable() else ascii(h) for h in header]  # a binary file's bytes: shown, not sent to the terminal
    return ", ".join(names) if len(names) <= most else f"{', '.join(names[:most])}, ... ({len(names)} in all)"


def _wide_csv(path: Path, cfg: DataConfig, header: list[str], reader: Any, number: Callable[[str], str],
              need_labels: bool, first_row: int = 2) -> tuple[np.ndarray, list[str] | None, list[str] | None]:
    """`[data] layout = "wide"`: one univariate series a row, its steps the columns other than the
    label (and the sample id, when the header has one), in header order; empty cells at the end
    pad a shorter series, inside it they are missing values."""
    if cfg.label_column not in header and need_labels:
        raise _fail(path, f"missing label_column column '{cfg.label_column}' (columns: {_columns(header)})")
    i_label = header.index(cfg.label_column) if cfg.label_column in header else None
    i_sample = header.index(cfg.sample_column) if cfg.sample_column in header else None
    steps = [i for i in range(len(header)) if i not in (i_label, i_sample)]
    if not steps:
        raise _fail(path, "no value columns besides the label column")
    seqs, labels, ids = [], [], {}
    label_name = _LabelNames(path)
    for line, row in enumerate(reader, start=first_row):
        if not row:
            continue
        if len(row) != len(header):
            raise _fail(path, f"line {line}: {len(row)} fields, the header has {len(header)}")
        if i_sample is not None:
            sid = row[i_sample].strip()
            if sid in ids:
                raise _fail(path, f"line {line}: sample {sid!r} is on line {ids[sid]} too; with layout = \"wide\" "
                            "each row is one whole series")
            ids[sid] = line
        if i_label is not None:
            labels.append(label_name(line, number(row[i_label])))
        try:
            seqs.append(np.asarray([[_csv_float(number(row[i]))] for i in steps], dtype=np.float64))
        except ValueError:
            bad = next(i for i in steps if not _is_float(number(row[i])))
            raise _fail(path, f"line {line}: column '{header[bad]}' value {row[bad]!r} is not a number") from None
    if not seqs:
        raise _fail(path, "no data rows")
    first = np.array([seq[0, 0] for seq in seqs])
    stem = [header[i].rstrip("0123456789").lower() for i in steps[:2]]  # "t0", "t1": one pattern; "id", "t0": not
    if (len(seqs) >= 5 and len(steps) >= 2 and stem[0] != stem[1] and np.all(first == np.round(first))
            and np.all(np.diff(first) == 1)):
        # a column counting the rows is an id or a row index, not the first step of every series
        raise _fail(path, f"column '{header[steps[0]]}' counts the rows ({first[0]:.0f}, {first[1]:.0f}, ...): "
                    "an id, not a time step? name it in [data] sample_column, or write the file without it")
    return _pad(seqs), None if i_label is None else labels, None if i_sample is None else list(ids)


def _read_text(path: Path) -> str:
    """A text data file's content: UTF-8 (a byte-order mark, which spreadsheet programs write, dropped), else Latin-1."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _fail(path, "data file not found") from None
    except OSError as e:
        raise _fail(path, f"cannot read data file: {e.strerror}") from e
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with its byte-order mark (Excel's "Unicode text")
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise _fail(path, "starts like UTF-16 text but does not decode as it; save it as UTF-8") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # a spreadsheet's "ANSI" text: Latin-1 keeps every byte, so no two labels merge
        return raw.decode("latin-1")


def load_ucr_table(path: Path) -> tuple[np.ndarray, list[str]]:
    """Raw X [N, T, 1] and each series' label name from a UCR archive table: no header, one series a
    line, its label first, then its values; tab-separated in .tsv files (an empty cell is missing),
    separated by spaces in .txt files. "NaN" at the end pads a shorter series."""
    text = _read_text(path)
    tabs = path.suffix.lower() == ".tsv"
    seqs: list[np.ndarray] = []
    labels: list[str] = []
    label_name = _LabelNames(path)
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        # a leading tab is an empty label cell, not padding to strip (trailing empty cells pad the series)
        cells = raw.strip(" \r\n").split("\t") if tabs else raw.split()
        if len(cells) < 2:
            raise _fail(path, f"line {n}: a label and no values (expected {'tab' if tabs else 'space'}-separated: "
                        "label, then the series)")
        labels.append(label_name(n, cells[0]))
        try:
            values = np.asarray([_csv_float(v) for v in cells[1:]], dtype=np.float64)
        except ValueError:
            col, bad = next((i, v) for i, v in enumerate(cells[1:], start=2) if not _is_float(v))
            raise _fail(path, f"line {n}: column {col} value {bad!r} is not a number") from None
        seqs.append(_trim_padding(values[:, None]))
    if not seqs:
        raise _fail(path, "no data rows")
    return _pad(seqs), labels


def _trim_padding(seq: np.ndarray) -> np.ndarray:
    """A [T, F] series without its trailing all-missing steps (padding); one step at least."""
    observed = np.flatnonzero(~np.isnan(seq).all(axis=1))
    return seq[: observed[-1] + 1 if len(observed) else 1]


def load_arff(path: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """Raw X (NaN for '?' and padding), the label of each series and the declared labels of an ARFF
    file as the UCR/UEA archive writes them: numeric attributes, one series a row, then a nominal
    class attribute; or (multivariate) one relational attribute whose value quotes the dimensions,
    separated by '\\n', then the class."""
    text = _read_text(path)
    attrs: list[tuple[str, str]] = []  # (name, type) of the top-level attributes
    nested: str | None = None  # the relational attribute being declared
    seqs: list[np.ndarray] = []
    labels: list[str] = []
    declared: list[str] | None = None
    relational = False
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("%"):
            continue
        if declared is None:  # the header: its words may be separated by tabs as well as blanks
            word, rest = (line.split(None, 1) + [""])[:2]
            key = word.lower()
            if key == "@relation":
                continue
            if key == "@end":
                nested = None
                continue
            if key == "@attribute":
                name, kind = _arff_attribute(path, n, rest)
                if nested is None:
                    attrs.append((name, kind))
                    nested = name if kind.lower() == "relational" else None
                continue
            if key != "@data":
                what = f"unknown header {word!r}" if word.startswith("@") else "data before the @data line"
                raise _fail(path, f"line {n}: {what} (an ARFF file: @relation, @attribute, @data)")
            declared = _arff_classes(path, attrs)
            relational = attrs[0][1].lower() == "relational"  # _arff_classes: then it is the only series attribute
            continue
        if line.startswith("{"):
            raise _fail(path, f"line {n}: sparse ARFF rows are not supported")
        body, label = _arff_label(line)
        label = unicodedata.normalize("NFC", _unquote(label))
        if label not in declared:
            raise _fail(path, f"line {n}: class label {label!r} is not declared by the class attribute "
                        f"{attrs[-1][0]} ({', '.join(declared)})")
        dims = body.strip().strip("'\"").split("\\n") if relational else [body]
        cols = [_archive_values(path, n, part, d if relational else None) for d, part in enumerate(dims, start=1)]
        if len({len(c) for c in cols}) > 1 or (seqs and len(cols) != seqs[0].shape[1]):
            sizes = "/".join(str(len(c)) for c in cols)
            raise _fail(path, f"line {n}: ragged dimensions: {len(cols)} dimension(s) of {sizes} values")
        if not relational and len(cols[0]) != len(attrs) - 1:
            raise _fail(path, f"line {n}: {len(cols[0]) + 1} values, the header declares {len(attrs)} attributes")
        seqs.append(_trim_padding(np.asarray(cols, dtype=np.float64).T))
        labels.append(label)
    if declared is None:
        raise _fail(path, "no @data line (not an ARFF file?)")
    if not seqs:
        raise _fail(path, "no data rows after @data")
    return _pad(seqs), labels, declared


def _archive_values(path: Path, n: int, part: str, dim: int | None) -> list[float]:
    """One dimension of a .ts or .arff row: comma-separated numbers, '?' a missing value."""
    values = [v.strip() for v in part.split(",")]
    try:
        return [math.nan if v == "?" else float(v) for v in values]
    except ValueError:
        bad = next(v for v in values if v != "?" and not _is_number(v))
        raise _fail(path, f"line {n}: {'' if dim is None else f'dimension {dim} '}value {bad!r} is not a number "
                    "(missing values are '?')") from None


def _arff_attribute(path: Path, n: int, rest: str) -> tuple[str, str]:
    """An @attribute line's name (quotes dropped) and type."""
    rest = rest.strip()
    if rest[:1] in ("'", '"'):
        name, _, kind = rest[1:].partition(rest[0])
    else:
        name, kind = (rest.split(None, 1) + [""])[:2]
    if not kind.strip():
        raise _fail(path, f"line {n}: @attribute {rest!r} has no type")
    return name, kind.strip()


def _arff_commas(text: str) -> list[int]:
    """Positions of the commas outside quotes: a value that starts with ' or " is quoted to the same
    quote (a backslash escapes the next character); a quote inside a bare value (don't) is a letter."""
    out, quote, escaped, start = [], None, False, True
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quote:
            if ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch == ",":
            out.append(i)
            start = True
        elif start and ch in "'\"":
            quote, start = ch, False
        elif not ch.isspace():
            start = False
    return out


def _arff_label(line: str) -> tuple[str, str]:
    """A data row's values and its class label, the last value (a quoted one may hold commas: 'a,b').
    Read from the end of the row: rows of thousands of values are not walked character by character."""
    end = line.rstrip()
    quote, pos = end[-1:], len(end) - 1
    while quote in ("'", '"') and (pos := end.rfind(quote, 0, pos)) >= 0:
        before = end[:pos].rstrip()
        if not before or before.endswith(","):  # the quote that opens the last value
            return before[:-1], end[len(before):]
    body, _, label = line.rpartition(",")
    return body, label


def _unquote(value: str) -> str:
    """An ARFF value without its blanks and its quotes."""
    value = value.strip()
    return value[1:-1] if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"" else value.strip("'\"")


def _arff_classes(path: Path, attrs: list[tuple[str, str]]) -> list[str]:
    """The class names the last attribute declares; the others must be numeric (or one relational)."""
    if len(attrs) < 2:
        raise _fail(path, "needs the series' attributes and a class attribute, the header declares "
                    f"{len(attrs)} attribute(s)")
    name, kind = attrs[-1]
    if not (kind.startswith("{") and kind.endswith("}")):
        raise _fail(path, f"the last attribute {name!r} is the class and must be nominal ({{a,b,...}}), got "
                    f"{kind!r}: cycle-optuna classifies")
    inner = kind[1:-1]
    cuts = [-1, *_arff_commas(inner), len(inner)]
    classes = _same_text(_unquote(inner[a + 1:b]) for a, b in zip(cuts, cuts[1:]) if inner[a + 1:b].strip())
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise _fail(path, f"the class attribute {name!r} needs two or more distinct labels, got {kind}")
    series = attrs[:-1]
    if not (len(series) == 1 and series[0][1].lower() == "relational"):
        bad = next((a for a in series if a[1].lower() not in ("numeric", "real", "integer")), None)
        if bad:
            raise _fail(path, f"attribute {bad[0]!r} has type {bad[1]!r}: the series' attributes must be "
                        "numeric, or one relational attribute (multivariate)")
    return classes


# Checks added after studies already ran on such files (two spellings of one integer label, an .npz
# test file beside named classes) refuse new work only: reading an existing study's data, as
# best/report/refit/predict do, keeps the mapping it ran with (see `as_it_ran`).
_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("cycle_optuna_data_strict", default=True)


@contextlib.contextmanager
def as_it_ran() -> Iterator[None]:
    """Read an existing study's data as the study read it, without the checks added since."""
    token = _STRICT.set(False)
    try:
        yield
    finally:
        _STRICT.reset(token)


class _LabelNames:
    """A file's label cells as class names (:func:`_label_name`); two integer spellings of one class
    in one file (007 and 7, +7 and 7) are refused rather than merged into one class unseen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spelled: dict[str, tuple[str, int]] = {}  # class -> its first integer spelling and line

    def __call__(self, line: int, cell: str) -> str:
        name = _label_name(self.path, line, cell)
        written = cell.strip()
        if re.fullmatch(r"[+-]?\d+", written) and _STRICT.get():  # 7.0 and 7 are one class, as documented; 007 and 7 a guess
            first, at = self.spelled.setdefault(name, (written, line))
            if first != written:
                raise _fail(self.path, f"line {line}: label {written!r} and label {first!r} (line {at}) are the "
                            f"same integer, {name}: write every label of a class the same way")
        return name


def _label_name(path: Path, line: int, cell: str) -> str:
    """A label cell as a class name: a name as written, or an integer in canonical form (1.0 -> 1)."""
    name = cell.strip()
    if not name:
        raise _fail(path, f"line {line}: empty label")
    if name.lower() in MISSING:
        raise _fail(path, f"line {line}: missing label ({name!r}): every series needs its class (an empty cell, "
                    "NA, N/A, null, none, ? and NaN mean no value; a class of that name needs another, e.g. none_)")
    if not _is_number(name):
        return name
    try:
        return str(int(name))  # an integer literal exactly, however long (a float would merge 2**53 + 1 into 2**53)
    except ValueError:
        pass
    value = float(name)
    if math.isinf(value):  # "inf", "Infinity": no number of a class, and no tool's word for a missing one
        return name
    if value != round(value):
        raise _fail(path, f"line {line}: label {name!r} is not a class: labels are integers or names")
    return str(int(value))


MISSING = {"", "na", "n/a", "null", "none", "?"}  # cells that mean "no value" (R writes NA), besides NaN


def _csv_float(s: str) -> float:
    # an empty cell is a missing value, like NaN
    if s.strip().lower() in MISSING:
        return math.nan
    if "_" in s:  # Python reads 1_000 as 1000; no spreadsheet writes it: a value to look at, not to guess
        raise ValueError(f"could not convert string to float: {s!r}")
    return float(s)


def _is_float(s: str) -> bool:
    """A .csv/.tsv cell that reads as a number (an empty cell, NA and the like: missing)."""
    return s.strip().lower() in MISSING or _is_number(s)


def _is_number(s: str) -> bool:
    if "_" in s:
        return False
    try:
        float(s)
        return True
    except ValueError:
        return False


def _pad(seqs: list[np.ndarray], length: int | None = None) -> np.ndarray:
    """[T_i, F] arrays -> [N, T, F] float64 (normalised before the cast to float32, so a large offset
    keeps its small changes), shorter ones padded at the end with NaN."""
    t = length or max(len(s) for s in seqs)
    out = np.full((len(seqs), t, seqs[0].shape[1]), np.nan, dtype=np.float64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


# .ts header keys (lower case: the archives spell them in either case) and what each holds
_TS_FLAGS = ("timestamps", "missing", "univariate", "equallength")
_TS_KEYS = ("problemname", *_TS_FLAGS, "dimensions", "serieslength", "classlabel", "targetlabel", "data")
_TS_SPELLING = ("@problemName", "@timeStamps", "@missing", "@univariate", "@equalLength", "@dimensions",
                "@seriesLength", "@classLabel", "@targetLabel", "@data")


_TS_COMMENTS = ("#", "%")  # "%": the ARFF comment the format descends from (aeon ships files with it)


def load_ts(path: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """Raw X (NaN for '?' and padding), the label of each sequence and the declared labels of a .ts file."""
    text = _read_text(path)
    head: dict[str, Any] = {}
    seqs: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(_TS_COMMENTS):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise _fail(path, f"line {n}: data before the @data line")
            in_data = _ts_header(path, n, line, head)
            continue
        seq, label = _ts_case(path, n, line, head, n_dims=seqs[0].shape[1] if seqs else None)
        if head.get("equallength") and seqs and len(seq) != len(seqs[0]):
            raise _fail(path, f"line {n}: {len(seq)} values, but @equalLength true and the first series has "
                        f"{len(seqs[0])}")
        seqs.append(seq)
        labels.append(label)
    if not in_data:
        raise _fail(path, "no @data line (not a .ts file?)")
    if not seqs:
        raise _fail(path, "no data rows after @data")
    return _pad(seqs), labels, head["classlabel"]


def _ts_header(path: Path, n: int, line: str, head: dict[str, Any]) -> bool:
    """Record one header line in ``head``; True at @data."""
    spelled, *words = line[1:].split() or [""]
    key, rest = spelled.lower(), " ".join(words)
    if key not in _TS_KEYS:
        raise _fail(path, f"line {n}: unknown header '@{spelled}'; known: {', '.join(_TS_SPELLING)}")
    if key == "data":
        if "classlabel" not in head:
            raise _fail(path, "no @classLabel header: classification needs class labels")
        if head.get("univariate") and head.get("dimensions", 1) != 1:
            raise _fail(path, f"@univariate true with @dimensions {head['dimensions']}")
        return True
    if key in _TS_FLAGS or key in ("classlabel", "targetlabel"):
        flag = words[0].lower() if words else ""
        if flag not in ("true", "false"):
            raise _fail(path, f"line {n}: @{key} must be true or false, got {' '.join(words) or 'nothing'!r}")
        value = flag == "true"
        if key == "timestamps" and value:
            raise _fail(path, f"line {n}: @timeStamps true is not supported (values with time stamps); "
                        "resample to a regular series")
        if key == "targetlabel" and value:
            raise _fail(path, f"line {n}: @targetLabel true is a regression file; cycle-optuna classifies "
                        "(needs @classLabel true)")
        if key == "classlabel":
            if not value:
                raise _fail(path, f"line {n}: @classLabel false: classification needs class labels")
            names = _same_text(words[1:])
            if len(names) < 2 or len(set(names)) != len(names):
                raise _fail(path, f"line {n}: @classLabel true needs two or more distinct labels, got {words[1:]}")
            head[key] = names
        else:
            head[key] = value
    elif key in ("dimensions", "serieslength"):
        if len(words) != 1 or not (words[0].isascii() and words[0].isdigit()) or int(words[0]) < 1:
            raise _fail(path, f"line {n}: @{key} must be a positive integer, got {rest.strip()!r}")
        head[key] = int(words[0])
    return False


def _ts_case(path: Path, n: int, line: str, head: dict[str, Any], n_dims: int | None) -> tuple[np.ndarray, str]:
    """One sequence [T, F] and its label from a .ts data line (dimensions separated by ':')."""
    *dims, label = line.split(":")
    label = unicodedata.normalize("NFC", label.strip())
    if label not in head["classlabel"]:
        raise _fail(path, f"line {n}: class label {label!r} is not declared in @classLabel "
                    f"({' '.join(head['classlabel'])})")
    want = head.get("dimensions") or (1 if head.get("univariate") else n_dims)
    if not dims or (want is not None and len(dims) != want):
        raise _fail(path, f"line {n}: ragged dimensions: {len(dims)} dimension(s), expected {want} "
                    f"({'from @dimensions' if head.get('dimensions') else 'as in the first series'})")
    cols = [np.asarray(_archive_values(path, n, part, d), dtype=np.float64) for d, part in enumerate(dims, start=1)]
    lengths = [len(c) for c in cols]
    if len(set(lengths)) > 1:
        raise _fail(path, f"line {n}: ragged dimensions: dimension 1 has {lengths[0]} values, dimension "
                    f"{next(i for i, k in enumerate(lengths, 1) if k != lengths[0])} has "
                    f"{next(k for k in lengths if k != lengths[0])}")
    if head.get("equallength") and head.get("serieslength") and lengths[0] != head["serieslength"]:
        raise _fail(path, f"line {n}: {lengths[0]} values, but @equalLength true with @seriesLength "
                    f"{head['serieslength']}")
    return np.stack(cols, axis=1), label


def _same_text(labels: Any) -> list[str]:
    """Labels in Unicode's composed form (NFC): "café" typed with a combining accent, as some
    systems save it, is the same class as "café" with the accented letter."""
    return [unicodedata.normalize("NFC", label) for label in labels]


def class_order(declared: list[str]) -> tuple[str, ...]:
    """Class names in index order: numeric order when every name is a number, else as declared."""
    if all(_is_float(name) for name in declared):
        return tuple(sorted(declared, key=float))
    return tuple(declared)


def check_arrays(path: Path | str, x: Any, y: Any, *, named: bool = False,
                 ids: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate raw arrays; return X float64 (NaN = missing; every value finite in float32, which the
    model sees after normalisation), y int64 and the number of classes.

    ``named``: y indexes a test file's labels into the training file's classes, already checked by
    name; such a file may lack classes (a small test file), so only X is checked further. ``ids``:
    each series' id in the file (a .csv file's sample column), which messages name it by; else its
    position (0-based).
    """
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
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)  # what the model sees: a finite value beyond float32's range is inf there
    if np.isinf(x32).any():
        bad = np.argwhere(np.isinf(x32))[0]
        big = "" if np.isinf(x).any() else " after conversion to 32-bit floats (|x| > 3.4e38)"
        raise _fail(path, f"X has {int(np.isinf(x32).sum())} inf values{big} (first at {_series(bad[0], ids)}, "
                    f"step {bad[1]}, feature {bad[2]}); only NaN may mark a missing value")
    empty = np.flatnonzero(np.isnan(x).all(axis=(1, 2)))
    if len(empty):
        raise _fail(path, f"{_series(empty[0], ids)} has no observed values (all NaN)"
                    f"{f' and {len(empty) - 1} more' if len(empty) > 1 else ''}")
    if not np.isfinite(y).all():
        raise _fail(path, "y has NaN/inf labels")
    if (y != np.round(y)).any():
        raise _fail(path, f"labels must be integers 0..K-1, got {float(y[y != np.round(y)][0]):g}")
    if (y < 0).any():
        raise _fail(path, f"labels must be integers 0..K-1, got negative label {int(y.min())}")
    if y.max() >= 2**62:  # past 2**63 the cast below would wrap it round to another (or a negative) label
        raise _fail(path, f"labels must be integers 0..K-1, got label {y.max():.6g}")
    y = y.astype(np.int64)
    x = x.astype(np.float64)  # normalised in float64: 100000000.25 and 100000000.5 differ, in float32 they do not
    if named:
        return x, y, int(y.max()) + 1
    present = np.unique(y)
    if len(present) < 2:
        raise _fail(path, f"only one class ({int(present[0])}); classification needs at least two")
    k = int(y.max()) + 1
    if k > len(present):  # present holds distinct labels in 0..k-1: some are missing (never build range(k): y may say 10**12)
        have, missing = set(present.tolist()), []
        for label in range(k):
            if label not in have:
                missing.append(label)
                if len(missing) == 5:
                    break
        shown = ", ".join(map(str, missing)) + (", ..." if k - len(present) > len(missing) else "")
        raise _fail(path, f"labels must be 0..K-1 with every class present: labels go up to {k - 1} but "
                    f"{k - len(present)} class(es) have no samples ({shown})")
    return x, y, k


def _series(i: int, ids: list[str] | None) -> str:
    """Series i as a message names it: by its id in the file when it has one ("sample 'b7'"), else by
    its position ("sample 3"; a .csv file's id column is also called sample, so an id is quoted)."""
    return f"sample {ids[i]!r}" if ids is not None and i < len(ids) else f"sample {i}"


def read_file(path: Path, cfg: DataConfig, classes: tuple[str, ...] | None = None, *,
              features: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Checked X, y and class names of a data file; ``classes`` and ``features`` (a .csv file's
    feature columns): the training file's, for a test file."""
    x, y, names, _, _ = _read(path, cfg, classes, need_labels=True, features=features)
    return x, y, names


def read_inputs(path: Path, cfg: DataConfig, classes: tuple[str, ...], *, features: tuple[str, ...] | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """New data for a study whose classes are `classes`: checked X, y indexed into `classes` (None
    when the file has no labels: a .csv without the label column, an .npz without y) and the
    series' ids (a .csv file's sample ids, else None); ``features``: the training file's .csv
    feature columns, which a .csv file's are matched to by name."""
    x, y, _, ids, _ = _read(path, cfg, classes, need_labels=False, features=features)
    return x, y, ids


def _read(path: Path, cfg: DataConfig, classes: tuple[str, ...] | None, *, need_labels: bool,
          features: tuple[str, ...] | None = None
          ) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...], list[str] | None, tuple[str, ...] | None]:
    """read_file, and without `need_labels` read_inputs: also a file without labels (y None), ids,
    and a long .csv file's feature column names (None for other files)."""
    if path.exists() and not path.is_file():  # a directory, or a FIFO or device that would block the read
        raise _fail(path, "not a regular file")
    suffix = path.suffix.lower()
    ids = names_of_features = None
    if suffix in (".ts", ".arff", ".csv", ".tsv", ".txt"):  # labels are names
        if suffix in (".ts", ".arff"):
            x, labels, declared = load_ts(path) if suffix == ".ts" else load_arff(path)
            if classes is not None:  # written 1.0 here and 1 in the training file: the same class
                labels, declared = _as_classes(labels, classes), _as_classes(declared, classes)
            found = class_order(declared)
            if classes is not None and set(declared) != set(classes):
                raise _fail(path, f"class set differs from the training file's: "
                            f"{'@classLabel' if suffix == '.ts' else 'the class attribute'} declares "
                            f"{' '.join(found)}, the training file has {' '.join(classes)}")
        else:
            if suffix == ".csv":
                x, labels, ids, names_of_features = load_csv(path, cfg, need_labels=need_labels, features=features)
            else:
                x, labels = load_ucr_table(path)
            if labels is None:
                return (*_unlabelled(path, x, classes, ids), names_of_features)
            labels = _same_text(labels)
            if classes is not None:
                labels = _as_classes(labels, classes)
            found = class_order(sorted(set(labels)))
            if classes is not None and (unknown := sorted(set(labels) - set(classes))):
                raise _fail(path, f"class(es) {', '.join(unknown)} not in the training file's classes "
                            f"({', '.join(classes)})")
        if classes is None and len(found) == 1:
            raise _fail(path, f"only one class ({found[0]!r}); classification needs at least two")
        if classes is None and (empty := [c for c in found if c not in set(labels)]):  # declared, never used
            raise _fail(path, f"class(es) {', '.join(empty)} declared but no series has them; a training file needs "
                        "series of every class it declares (remove them from the declaration)")
        names = found if classes is None else classes
        index = {name: i for i, name in enumerate(names)}
        x, y, _ = check_arrays(path, x, np.asarray([index[label] for label in labels]), named=classes is not None,
                               ids=ids)
        return x, y, names, ids, names_of_features
    if suffix == ".npz":
        x, y = load_npz(path, need_y=need_labels)
        if y is None:
            return (*_unlabelled(path, x, classes, None), None)
    else:
        raise _fail(path, f"unsupported data file type (expected {', '.join(DATA_SUFFIXES)})")
    x, y, k = check_arrays(path, x, y, named=classes is not None)  # a test file may lack a class
    if classes is not None and k > len(classes):
        extra = sorted({int(v) for v in np.unique(np.asarray(y)) if v >= len(classes)})
        shown = ", ".join(map(str, extra[:5])) + (f", ... ({len(extra)} in all)" if len(extra) > 5 else "")
        raise _fail(path, f"class set differs from the training file's: label{'s' if len(extra) > 1 else ''} {shown} "
                    f"here, 0..{len(classes) - 1} in the training file")
    return x, y, classes if classes is not None else tuple(str(c) for c in range(k)), None, None


def _as_classes(labels: list[str], classes: tuple[str, ...]) -> list[str]:
    """A file's labels as the study's class names: a name the study lacks that is the number of one
    of its classes (.ts keeps `1.0` as written, .csv reads it as `1`) is that class."""
    numeric: dict[float, str] = {}
    for name in classes:
        if _is_number(name) and math.isfinite(float(name)):
            numeric.setdefault(float(name), name)
    if not numeric:
        return list(labels)
    known = set(classes)
    return [label if label in known or not _is_number(label) else numeric.get(float(label), label) for label in labels]


def _unlabelled(path: Path, x: np.ndarray, classes: tuple[str, ...] | None, ids: list[str] | None
                ) -> tuple[np.ndarray, None, tuple[str, ...], list[str] | None]:
    """New data without its classes: X checked as a labelled file's is."""
    x = np.asarray(x)
    return check_arrays(path, x, np.zeros(len(x) if x.ndim else 1), named=True, ids=ids)[0], None, classes or (), ids


# ---------------------------------------------------------------------------------------------
# Split and normalisation


def stratified_split(path: Path | str, y: np.ndarray, n_classes: int, val_fraction: float, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test indices; each class split in the same proportions; depends only on y and seed.

    ``test_fraction = 0`` carves no test split (an official test file holds it): test is empty.
    A class too small to give every split a series (archives have classes of one or two training
    series) fills the training split first, then validation, then test: the model still learns it.
    """
    rng = np.random.default_rng([seed, 0x5B17])
    parts: tuple[list, list, list] = ([], [], [])
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = len(idx)
        n_val = max(1, round(n * val_fraction))
        n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
        n_test = min(n_test, max(0, n - 1 - n_val))  # train keeps one before test gets any ...
        n_val = min(n_val, max(0, n - 1))  # ... and before validation does
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val:n_val + n_test])
        parts[0].append(idx[n_val + n_test:])
    return tuple(rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts)  # type: ignore[return-value]


def resolve_folds(cfg: DataConfig, n_val: int, n_pool: int, n_classes: int = 1) -> int:
    """The folds cycles are scored on: [data] folds, "auto" resolved on the validation split's size
    (see small_validation)."""
    if cfg.folds == FOLDS_AUTO:
        return max(1, min(AUTO_FOLDS, n_pool // 2)) if small_validation(n_val, n_classes) else 1
    return int(cfg.folds)


def small_validation(n_val: int, n_classes: int) -> bool:
    """Whether a validation split of n_val series over n_classes classes is too small to score cycles
    on, so that "auto" cross-validates: at most AUTO_FOLDS_MAX_VAL series, or fewer than
    AUTO_FOLDS_MIN_VAL_PER_CLASS per class."""
    return n_val <= AUTO_FOLDS_MAX_VAL or n_val < AUTO_FOLDS_MIN_VAL_PER_CLASS * n_classes


def cv_folds(y: np.ndarray, n_classes: int, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each series; each class dealt over the folds in turn; depends only on y and seed."""
    rng = np.random.default_rng([seed, 0xF01D])
    out = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        out[idx] = (offset + np.arange(len(idx))) % k
        offset += len(idx)
    return out


def normalise(x: np.ndarray | torch.Tensor, mean: Any, std: Any) -> np.ndarray | torch.Tensor:
    """(x - mean) / std over the last (feature) axis, computed in float64 (a large offset keeps its
    small changes), returned as float32, the same kind as x; NaN stays NaN."""
    if isinstance(x, torch.Tensor):
        m = torch.as_tensor(np.asarray(mean, dtype=np.float64), device=x.device)
        s = torch.as_tensor(np.asarray(std, dtype=np.float64), device=x.device)
        return ((x.double() - m) / s).float()
    return ((np.asarray(x, dtype=np.float64) - np.asarray(mean, dtype=np.float64))
            / np.asarray(std, dtype=np.float64)).astype(np.float32)


def fill_partial(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Normalised x with NaN set to 0 (the training mean) in steps that have an observed feature.

    Steps whose features are all NaN stay NaN: they are padding or missing, and the model masks them.
    """
    if isinstance(x, torch.Tensor):
        nan = torch.isnan(x)
        return torch.where(nan & ~nan.all(dim=-1, keepdim=True), torch.zeros((), dtype=x.dtype, device=x.device), x)
    nan = np.isnan(x)
    return np.where(nan & ~nan.all(axis=-1, keepdims=True), np.float32(0), x).astype(x.dtype)


def train_stats(x_train: np.ndarray, *, where: Path | str = "data") -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over samples and observed steps of the training split."""
    flat = x_train.reshape(-1, x_train.shape[-1]).astype(np.float64)
    observed = ~np.isnan(flat)
    count = observed.sum(0)
    if not count.all():
        i = int(np.flatnonzero(count == 0)[0])
        raise _fail(Path(where), f"feature {i} (feature column {i + 1} of {len(count)} in file order, not "
                    "counting the sample and label columns) has no observed value in the training split")
    mean = np.where(observed, flat, 0.0).sum(0) / count
    std = np.sqrt(np.where(observed, (flat - mean) ** 2, 0.0).sum(0) / count)
    std = np.where(std < _STD_FLOOR, 1.0, std)
    return mean, std  # float64: a mean of 100000000.25 is kept


def load_task(cfg: DataConfig, seed: int, *, data_path: Path | None = None, test_path: Path | None = None) -> TaskData:
    """The task's normalised splits: the synthetic task when ``data_path`` is None, else a data file.

    ``test_path``: an official test split (a file of the same kind); validation then comes from
    ``data_path`` alone.
    """
    names: tuple[str, ...] = ()
    features = None  # a .csv training file's feature columns, by name
    if data_path is None:
        where: Path | str = "<synthetic task>"
        x, y = make_synthetic(cfg, seed)
        k = cfg.n_classes
    else:
        where = data_path = Path(data_path)
        x, y, names, _, features = _read(data_path, cfg, None, need_labels=True)
        k = len(names)
    if test_path is None:
        tr, va, te = stratified_split(where, y, k, cfg.val_fraction, cfg.test_fraction, seed)
        x_test, y_test = x[te], y[te]
    else:
        test_path = Path(test_path)
        indices = tuple(str(c) for c in range(k))
        if test_path.suffix.lower() == ".npz" and names and names != indices and _STRICT.get():
            # an .npz's y holds indices; which name each stands for would be a guess (sorted? as first seen?)
            shown = ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
            raise _fail(test_path, f"an .npz's y holds class indices, and the classes of the training file {where} "
                        f"are names ({shown}): write the test file as a {where.suffix or 'text'} file with the "
                        "labels as they are written there")
        x_test, y_test, _ = read_file(test_path, cfg, classes=names or indices, features=features)
        if x_test.shape[2] != x.shape[2]:
            raise _fail(test_path, f"{x_test.shape[2]} feature(s) per step, but the training file {where} has "
                        f"{x.shape[2]}")
        t = max(x.shape[1], x_test.shape[1])  # one length for both: the shorter file is padded
        x, x_test = _pad_steps(x, t), _pad_steps(x_test, t)
        tr, va, _ = stratified_split(where, y, k, cfg.val_fraction, 0.0, seed)
    folds = resolve_folds(cfg, len(va), len(tr) + len(va), k)
    if not len(x_test):  # first: cross-validation (the hint below) would not cure it
        raise _fail(Path(where), "the test split is empty: no class has the three series it takes to give "
                    "training, validation and test one each; name an official test file in [data] test_source")
    if folds == 1 and not len(va):
        cure = ("[data] folds = 5 cross-validates instead" if len(tr) >= 10 else
                f"with {len(tr)} series there are too few to cross-validate either (5 folds take 10): add series")
        raise _fail(Path(where), f"the validation split is empty: no class has a series to spare for it "
                    f"(val_fraction={cfg.val_fraction}); {cure}")
    if folds > 1 and len(tr) + len(va) < 2 * folds:
        raise _fail(Path(where), f"[data] folds = {folds} needs at least {2 * folds} series outside the test split "
                    f"to cross-validate, it has {len(tr) + len(va)}")
    # with cross-validation every training series is also validated on: statistics of both splits
    mean, std = train_stats(x[tr] if folds == 1 else x[np.concatenate([tr, va])], where=where)

    def split(xs: np.ndarray, ys: np.ndarray, rows: np.ndarray | None, source: Path | str) -> tuple[torch.Tensor, torch.Tensor]:
        xn = normalise(xs, mean, std)
        if np.isinf(xn).any():  # finite as read, beyond float32 once scaled: the loss would be NaN, unexplained
            i, step, f = (int(v) for v in np.argwhere(np.isinf(xn))[0])
            sample = int(rows[i]) if rows is not None else i
            raise _fail(Path(source), f"series {sample + 1} (in file order), step {step + 1}, feature {f + 1}: value "
                        f"{float(xs[i, step, f]):.4g} is {abs(float(xs[i, step, f]) - mean[f]) / std[f]:.3g} training "
                        "standard deviations from the mean, too far for 32-bit floats; fix or drop that value")
        return torch.from_numpy(fill_partial(xn)), torch.from_numpy(ys)

    (xtr, ytr), (xva, yva) = split(x[tr], y[tr], tr, where), split(x[va], y[va], va, where)
    xte, yte = split(x_test, y_test, None if test_path is not None else te, test_path or where)
    fold_ids = None if folds == 1 else torch.from_numpy(cv_folds(np.concatenate([y[tr], y[va]]), k, folds, seed))
    return TaskData(xtr, ytr, xva, yva, xte, yte, mean=mean, std=std, n_classes=k, class_names=names,
                    fold_ids=fold_ids, feature_names=features or ())


def _pad_steps(x: np.ndarray, t: int) -> np.ndarray:
    if x.shape[1] == t:
        return x
    out = np.full((x.shape[0], t, x.shape[2]), np.nan, dtype=x.dtype)
    out[:, :x.shape[1]] = x
    return out


def load_study_data(cfg: StudyConfig) -> TaskData:
    """The task of a study config: its data file (and test file) resolved beside the study file."""
    return load_task(cfg.data, cfg.study.seed, data_path=resolve_data_path(cfg), test_path=resolve_test_path(cfg))
