"""Tasks: synthetic generator, file loaders, stratified split, leakage-free normalisation."""

from __future__ import annotations

import os
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from cycle_optuna.config import DataConfig
from cycle_optuna.data import bayes_predict, load_task, make_synthetic, normalise, stratified_split, train_stats
from cycle_optuna.errors import DataError

SMALL = DataConfig(n_samples=300, seq_len=8, n_features=4)


def _write_npz(path: Path, x, y) -> Path:
    np.savez(path, X=x, y=y)
    return path


def _toy(n: int = 60, t: int = 5, f: int = 3, k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, t, f)).astype(np.float32) * 3 + 5, np.arange(n) % k


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray, *, header=("sample", "label", "f0", "f1")) -> Path:
    lines = [",".join(header)]
    for i, (seq, label) in enumerate(zip(x, y)):
        for row in seq:
            lines.append(",".join([f"s{i}", str(label), *(repr(float(v)) for v in row)]))
    path.write_text("\n".join(lines) + "\n")
    return path


# --- synthetic task -----------------------------------------------------------------------------


def test_synthetic_is_deterministic():
    x1, y1 = make_synthetic(SMALL, 3)
    x2, y2 = make_synthetic(SMALL, 3)
    assert x1.dtype == np.float32 and y1.dtype == np.int64
    assert x1.shape == (300, 8, 4)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


def test_synthetic_seeds_differ():
    x1, _ = make_synthetic(SMALL, 0)
    x2, _ = make_synthetic(SMALL, 1)
    assert not np.allclose(x1, x2)


def test_synthetic_classes_balanced_and_time_means_uninformative():
    x, y = make_synthetic(dataclasses.replace(SMALL, n_samples=3000), 0)
    assert np.bincount(y).tolist() == [1000, 1000, 1000]
    # Class means of the time-averaged features agree within noise: a linear model on them is at chance.
    means = np.stack([x[y == c].mean(axis=(0, 1)) for c in range(3)])
    assert np.abs(means - means.mean(0)).max() < 0.15


def test_bayes_oracle_beats_chance_but_not_perfect():
    cfg = dataclasses.replace(SMALL, n_samples=1500, seq_len=16, n_features=8)
    x, y = make_synthetic(cfg, 0)
    acc = (bayes_predict(cfg, x) == y).mean()
    assert 0.8 < acc < 0.995


# --- split and normalisation ----------------------------------------------------------------------


def test_load_task_is_deterministic_per_seed():
    a, b, c = load_task(SMALL, 1), load_task(SMALL, 1), load_task(SMALL, 2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.y_val, c.y_val)


def test_stratified_split_proportions():
    d = load_task(SMALL, 0)  # 100 per class, 15% val, 15% test
    for y in (d.y_train, d.y_val, d.y_test):
        assert y.dtype == torch.int64
    assert torch.bincount(d.y_val).tolist() == [15, 15, 15]
    assert torch.bincount(d.y_test).tolist() == [15, 15, 15]
    assert torch.bincount(d.y_train).tolist() == [70, 70, 70]
    assert (d.n_classes, d.seq_len, d.n_features) == (3, 8, 4)


@pytest.mark.parametrize(("n", "with_test", "expect"), [
    (1, True, (1, 0, 0)), (2, True, (1, 1, 0)), (3, True, (1, 1, 1)), (1, False, (1, 0, 0)), (2, False, (1, 1, 0)),
])
def test_a_class_too_small_for_every_split_fills_training_first(n, with_test, expect):
    # archives hold classes of one or two training series (e.g. one series per class)
    y = np.r_[np.zeros(40, int), np.ones(n, int)]
    parts = stratified_split("a.npz", y, 2, 0.15, 0.15 if with_test else 0.0, 0)
    assert tuple(int((y[p] == 1).sum()) for p in parts) == expect
    assert tuple(int((y[p] == 0).sum()) for p in parts) == ((28, 6, 6) if with_test else (34, 6, 0))  # unchanged
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))


def test_stats_come_from_train_split_only(tmp_path):
    x, y = _toy(90)
    d = load_task(DataConfig(folds=1), 0, data_path=_write_npz(tmp_path / "a.npz", x, y))
    tr, va, te = stratified_split("a.npz", y, 3, 0.15, 0.15, 0)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(90))
    mean, std = train_stats(x[tr])
    np.testing.assert_array_equal(d.mean, mean)
    np.testing.assert_array_equal(d.std, std)
    full_mean, _ = train_stats(x)
    assert not np.allclose(d.mean, full_mean, atol=1e-4)
    np.testing.assert_allclose(d.x_train.numpy().reshape(-1, 3).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(d.x_train.numpy().reshape(-1, 3).std(0), 1, atol=1e-3)


def test_val_and_test_rows_do_not_change_stats(tmp_path):
    x, y = _toy(90)
    d = load_task(DataConfig(folds=1), 0, data_path=_write_npz(tmp_path / "a.npz", x, y))
    _, va, te = stratified_split("a.npz", y, 3, 0.15, 0.15, 0)
    x2 = x.copy()
    x2[np.concatenate([va, te])] = 1000.0
    d2 = load_task(DataConfig(folds=1), 0, data_path=_write_npz(tmp_path / "b.npz", x2, y))
    np.testing.assert_array_equal(d.mean, d2.mean)
    np.testing.assert_array_equal(d.std, d2.std)
    assert torch.equal(d.x_train, d2.x_train)
    assert not torch.equal(d.x_val, d2.x_val)


def test_constant_feature_std_is_floored(tmp_path):
    x, y = _toy(60)
    x[:, :, 1] = 7.0
    d = load_task(DataConfig(), 0, data_path=_write_npz(tmp_path / "a.npz", x, y))
    assert d.std[1] == 1.0
    assert torch.isfinite(d.x_train).all()


def test_normalise_numpy_and_torch_agree():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    mean, std = np.arange(4, dtype=np.float32), np.full(4, 2, dtype=np.float32)
    a = normalise(x, mean, std)
    b = normalise(torch.from_numpy(x), mean, std)
    assert isinstance(a, np.ndarray) and isinstance(b, torch.Tensor)
    np.testing.assert_allclose(a, b.numpy())
    np.testing.assert_allclose(a[0, 0], [0, 0, 0, 0])


def test_stats_are_json_ready():
    import json

    s = load_task(SMALL, 0).stats()
    assert json.loads(json.dumps(s)) == s
    assert len(s["mean"]) == 4 and s["seq_len"] == 8 and s["n_classes"] == 3
    assert s["n_train"] + s["n_val"] + s["n_test"] == 300


# --- files ---------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    x, y = _toy(60)
    d = load_task(DataConfig(), 0, data_path=_write_npz(tmp_path / "a.npz", x, y))
    assert d.n_classes == 3 and d.seq_len == 5 and d.n_features == 3
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 60
    restored = d.x_val.numpy() * d.std + d.mean
    flat = x.reshape(len(x), -1)
    assert all(np.abs(flat - r.ravel()).max(axis=1).min() < 1e-4 for r in restored)  # each is a row of the file


def test_a_large_offset_keeps_its_small_changes(tmp_path):
    """Normalised in float64 before the cast to float32: meter readings of 1e8 that move by 0.25 stay
    apart (in float32 every one of them is 100000000)."""
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    x = 1e8 + (y[:, None, None] - 0.5) * 0.5 + rng.normal(0, 0.05, (60, 5, 1))
    d = load_task(DataConfig(), 0, data_path=_write_npz(tmp_path / "big.npz", x, y))
    xs = d.x_train.numpy()[:, :, 0].mean(axis=1)
    ys = d.y_train.numpy()
    assert xs[ys == 1].min() > xs[ys == 0].max()  # the classes stay apart after normalisation


def test_npz_accepts_integral_float_labels(tmp_path):
    x, y = _toy(30)
    d = load_task(DataConfig(), 0, data_path=_write_npz(tmp_path / "a.npz", x, y.astype(np.float64)))
    assert d.y_train.dtype == torch.int64


def test_csv_round_trip(tmp_path):
    x, y = _toy(30, t=4, f=2)
    csv_d = load_task(DataConfig(), 0, data_path=_write_csv(tmp_path / "a.csv", x, y))
    npz_d = load_task(DataConfig(), 0, data_path=_write_npz(tmp_path / "a.npz", x, y))
    assert torch.allclose(csv_d.x_train, npz_d.x_train, atol=1e-5)
    assert torch.equal(csv_d.y_test, npz_d.y_test)


def test_csv_custom_columns_and_interleaved_ids(tmp_path):
    p = tmp_path / "c.csv"
    rows = ["id,a,cls,b"]
    for step in range(3):  # rows of different sequences interleaved: each id keeps its file order
        for i in range(9):
            rows.append(f"q{i},{i * 10 + step},{i % 3},{-step}")
    p.write_text("\n".join(rows))
    d = load_task(DataConfig(sample_column="id", label_column="cls", val_fraction=0.34, test_fraction=0.34), 0,
                  data_path=p)
    raw = d.x_train.numpy() * d.std + d.mean
    assert raw.shape[1:] == (3, 2)
    np.testing.assert_allclose(np.diff(raw[:, :, 0], axis=1), 1, atol=1e-4)  # a = i*10 + step, in order
    np.testing.assert_allclose(raw[:, :, 1], [[0, -1, -2]] * len(raw), atol=1e-4)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda x, y: (x[:, :, 0], y), "X must be 3-D"),
        (lambda x, y: (x, y[:-1]), "y must be 1-D with len N=60"),
        (lambda x, y: (x, y.reshape(-1, 1)), "y must be 1-D"),
        (lambda x, y: (x.astype(str), y), "X must be numeric"),
        (lambda x, y: (x, y.astype(str)), "y must hold integer labels"),
        (lambda x, y: (np.where(np.arange(60)[:, None, None] == 7, np.nan, x), y), "sample 7 has no observed values"),
        (lambda x, y: (np.where(np.arange(60)[:, None, None] == 7, np.inf, x), y), "inf values (first at sample 7"),
        (lambda x, y: (np.where(np.arange(60)[:, None, None] == 7, 1e39, x.astype(np.float64)), y),
         "inf values after conversion to 32-bit floats (|x| > 3.4e38) (first at sample 7"),
        (lambda x, y: (x, np.zeros_like(y)), "only one class"),
        (lambda x, y: (x, np.where(y == 1, 3, y)), "labels go up to 3 but 1 class(es) have no samples (1)"),
        # a label of 10**12 is named, not a list of a trillion missing classes (that ran out of memory)
        (lambda x, y: (x, np.where(y == 1, 10**12, y)),
         f"labels go up to {10**12} but {10**12 - 2} class(es) have no samples (1, 3, 4, 5, 6, ...)"),
        (lambda x, y: (x, np.where(y == 1, -1, y)), "negative label -1"),
        # past 2**63 a label wrapped round in the cast to int64 (1e300 became a negative label, dropped)
        (lambda x, y: (x, np.where(y == 1, 1e300, y)), "got label 1e+300"),
        (lambda x, y: (x, np.where(y == 1, 2**64 - 1, y).astype(np.uint64)), "got label 1.84467e+19"),
        (lambda x, y: (x, np.where(y == 1, 1.5, y)), "must be integers 0..K-1, got 1.5"),  # not np.float64(1.5)
    ],
)
def test_npz_errors(tmp_path, make, needle):
    x, y = make(*_toy(60))
    path = _write_npz(tmp_path / "bad.npz", x, y)
    with pytest.raises(DataError) as e:
        load_task(DataConfig(), 0, data_path=path)
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_npz_missing_arrays(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, features=np.zeros((4, 2, 2)), y=np.arange(4) % 2)
    with pytest.raises(DataError, match=r"bad\.npz: missing array\(s\) X \(found: features, y\)"):
        load_task(DataConfig(), 0, data_path=path)


def test_missing_file(tmp_path):
    for name in ("nope.npz", "nope.csv"):
        with pytest.raises(DataError, match=f"{name}: data file not found"):
            load_task(DataConfig(), 0, data_path=tmp_path / name)


def test_not_an_npz(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_text("hello")  # numpy's own message spoke of "pickled (object) data"
    with pytest.raises(DataError, match=r"junk\.npz: not an \.npz file: it is not a zip archive"):
        load_task(DataConfig(), 0, data_path=path)
    np.save(tmp_path / "one.npy", np.zeros((4, 3, 2)))
    (tmp_path / "one.npy").rename(path)  # np.load gave the bare array: a TypeError, exit 1
    with pytest.raises(DataError, match=r"junk\.npz: not an \.npz file: it holds one \.npy array"):
        load_task(DataConfig(), 0, data_path=path)
    path.write_bytes(b"PK\x03\x04" + b"\0" * 40)  # starts as a zip, is not one
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz"):
        load_task(DataConfig(), 0, data_path=path)


def test_an_npz_whose_header_declares_terabytes_is_named(tmp_path):
    """An array header may declare any shape: one of 10**11 x 8 x 2 floats was a MemoryError (exit 1)."""
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**11, 8, 2)})
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("X.npy", buf.getvalue() + b"\0" * 64)
        z.writestr("y.npy", _npy_bytes(np.arange(4) % 2))
    with pytest.raises(DataError, match=r"huge\.npz: array X declares shape \(100000000000, 8, 2\) "
                                        r"\(6,400,000,000,000 bytes of float32\) but holds 64 bytes: truncated or corrupt"):
        load_task(DataConfig(), 0, data_path=path)


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("id,label,f0\ns0,0,1\n", "missing sample_column column 'sample'"),
        ("sample,cls,f0\ns0,0,1\n", "missing label_column column 'label'"),
        ("sample,label,f0,f0\ns0,0,1,2\n", "column 'f0' appears twice in the header"),
        ("sample,label\ns0,0\n", "no feature columns"),
        ("sample,label,f0\ns0,0,1\ns0,0,abc\n", "line 3: column 'f0' value 'abc' is not a number"),
        ("sample,label,f0\ns0,0,1\ns0,0,1_000\n", "line 3: column 'f0' value '1_000' is not a number"),
        ("sample,label,f0\ns0,0,1\ns0,x,2\n", "line 3: sample 's0' changes label from 0 to x"),
        ("sample,label,f0\ns0,0.5,1\ns1,1,2\n", "line 2: label '0.5' is not a class: labels are integers or names"),
        ("sample,label,f0\ns0,,1\ns1,1,2\n", "line 2: empty label"),
        # R's NA and the like: a missing label, not a number and not a class name
        ("sample,label,f0\ns0,x,1\ns1,NA,2\n", "line 3: missing label ('NA')"),
        ("sample,label,f0\ns0,x,1\ns1,null,2\n", "line 3: missing label ('null')"),
        # a class really named so is told what to do
        ("sample,label,f0\ns0,x,1\ns1,none,2\n", "line 3: missing label ('none'): every series needs its class (an "
                                               "empty cell, NA, N/A, null, none, ? and NaN mean no value; a class of "
                                               "that name needs another, e.g. none_)"),
        # two spellings of one integer would be merged into one class unseen
        ("sample,label,f0\ns0,7,1\ns1,x,2\ns2,007,3\n", "line 4: label '007' and label '7' (line 2) are the same integer, 7"),
        ("sample,label,f0\ns0,+1,1\ns1,1,2\n", "line 3: label '1' and label '+1' (line 2)"),
        ("sample,label,f0\ns0,0,1\ns0,1,2\n", "changes label from 0 to 1"),
        ("sample,label,f0\ns0,0,1\ns1,1\n", "line 3: 2 fields"),
        ("sample,label,f0\n", "no data rows"),
        ("", "empty csv"),
        ("sample,label,f0\ns1,1,2\ns0,0,nan\n", "sample 's0' has no observed values"),  # by its id, not its position
        # a column of another case or spelling, or other names for id and class: what to set
        ("Sample,label,f0\ns0,a,1\ns1,b,2\n", "missing sample_column column 'sample' (columns: Sample, label, f0); "
                                                "did you mean 'Sample'? set [data] sample_column = 'Sample'"),
        ("sample,lable,f0\ns0,a,1\ns1,b,2\n", "did you mean 'lable'? set [data] label_column = 'lable'"),
        ("sample,activity,f0\ns0,a,1\ns1,b,2\n", "missing label_column column 'label' (columns: sample, activity, "
                                                  "f0); set [data] label_column to the column that holds each series' class"),
        ("sample,label,f0\ns0,0,inf\ns1,1,2\n", "inf values"),
        ("sample,label,f0\ns0,run,1\ns1,run,2\n", "only one class ('run')"),
        ("\x1b[2J\x07,x\ns0,1\n", "(columns: '\\x1b[2J\\x07', x)"),  # a binary file: no control bytes echoed
    ],
)
def test_csv_errors(tmp_path, text, needle):
    _assert_one_line_error(tmp_path / "bad.csv", text, needle)


def _assert_one_line_error(path: Path, text: str, needle: str) -> None:
    """Loading a file holding `text` fails with one line naming the file and `needle`."""
    path.write_text(text)
    with pytest.raises(DataError) as e:
        load_task(DataConfig(), 0, data_path=path)
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


@pytest.mark.parametrize("sep", [";", "\t"])
def test_csv_separated_by_semicolons_or_tabs(tmp_path, sep):
    from cycle_optuna.data import read_file

    path = tmp_path / "s.csv"
    path.write_text("\n".join(sep.join(r) for r in [("sample", "label", "f0", "f1"), ("s0", "a", "1", "2"),
                                                     ("s0", "a", "3", "4"), ("s1", "b", "5", "")]))
    x, y, names = read_file(path, DataConfig())
    assert names == ("a", "b") and x.shape == (2, 2, 2) and x[0, 1].tolist() == [3, 4] and np.isnan(x[1, 0, 1])


def test_wide_csv_is_one_series_a_row(tmp_path):
    from cycle_optuna.data import read_file

    wide = DataConfig(layout="wide")
    path = tmp_path / "w.csv"
    # an id column is not a step; an empty cell at the end pads a shorter series, inside it is missing
    path.write_text("t0,t1,label,sample,t2\n1,2,up,a,3\n4,,down,b,\n7,8,up,c,9\n")
    x, y, names = read_file(path, wide)
    assert names == ("down", "up") and y.tolist() == [1, 0, 1] and x.shape == (3, 3, 1)
    assert x[0, :, 0].tolist() == [1, 2, 3] and x[1, 0, 0] == 4 and np.isnan(x[1, 1:, 0]).all()
    task = load_task(wide, 0, data_path=path, test_path=path)
    assert task.x_test.shape[1:] == (3, 1)
    # the same file read as long format says how to read it
    _assert_one_line_error(tmp_path / "bad.csv", "label,t0,t1\nup,1,2\ndown,3,4\n",
                           "missing sample_column column 'sample' (columns: label, t0, t1); set [data] sample_column "
                           "to the column that holds each series' id (and label_column to its class), or, for one "
                           "series per row, [data] layout = \"wide\"")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("sample,label,t0\na,up,1\na,down,2\n", "line 3: sample 'a' is on line 2 too"),
        ("cls,t0\nup,1\n", "missing label_column column 'label'"),
        ("sample,label\na,up\n", "no value columns"),
        ("label,t0,t1\nup,1,x\n", "line 2: column 't1' value 'x' is not a number"),
        ("label,t0\nup,1\ndown\n", "line 3: 1 fields, the header has 2"),
        ("label,t0\n", "no data rows"),
    ],
)
def test_wide_csv_errors(tmp_path, text, needle):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        load_task(DataConfig(layout="wide"), 0, data_path=path)
    assert str(path) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("layout", ["long", "wide"])
def test_a_quote_never_closed_is_one_line_naming_the_file(tmp_path, layout):
    """The csv module reads on to the end of the file and raises its own error past 128 KiB."""
    path = tmp_path / "stray.csv"
    if layout == "long":
        rows = [f"s{i},{'x' if i % 2 else 'y'},{t * 0.1:.3f}" for i in range(400) for t in range(50)]
        rows[150] = 's3,"y,0.1'
        head = "sample,label,a"
    else:
        rows = [f"{'x' if i % 2 else 'y'}," + ",".join(f"{t * 0.1:.3f}" for t in range(50)) for i in range(800)]
        rows[150] = '"y,' + rows[150][2:]
        head = "label," + ",".join(f"t{t}" for t in range(50))
    path.write_text("\n".join([head, *rows]) + "\n")
    with pytest.raises(DataError) as e:
        load_task(DataConfig(layout=layout), 0, data_path=path)
    assert str(path) in str(e.value) and "a quote that is never closed?" in str(e.value) and "\n" not in str(e.value)


def test_semicolon_csv_reads_decimal_commas(tmp_path):
    from cycle_optuna.data import read_file

    # a spreadsheet in a locale that writes 1,5 for 1.5 separates cells with ';'
    path = tmp_path / "de.csv"
    path.write_text("sample;label;f0\ns0;1;1,5\ns0;1;-2,25\ns1;2,0;3\ns1;2;1e-3\n")
    x, y, names = read_file(path, DataConfig())
    assert names == ("1", "2")
    np.testing.assert_allclose(x[:, :, 0], [[1.5, -2.25], [3.0, 0.001]])
    _assert_one_line_error(tmp_path / "bad.csv", "sample;label;f0\ns0;1;1,5,2\ns1;2;3\n", "line 2: column 'f0' value '1,5,2' is not a number")


@pytest.mark.parametrize("sep", [";", ",", "\t"])
def test_excels_sep_line_names_the_delimiter(tmp_path, sep):
    """Excel writes (and reads) a first line "sep=;": it was read as the header, and the file refused
    as having a column without a name."""
    from cycle_optuna.data import read_file

    path = tmp_path / "excel.csv"
    decimal = "," if sep == ";" else "."
    rows = [("sample", "label", "f0"), ("s0", "a", f"1{decimal}5"), ("s0", "a", "2"), ("s1", "b", "3"), ("s1", "b", "x")]
    path.write_text(f"sep={sep}\r\n" + "\r\n".join(sep.join(r) for r in rows[:-1]) + "\r\n")
    x, y, names = read_file(path, DataConfig())
    assert names == ("a", "b") and x.shape == (2, 2, 1)
    np.testing.assert_allclose(x[:, :, 0], [[1.5, 2.0], [3.0, np.nan]])
    # line numbers in messages are the file's, the sep line counted
    _assert_one_line_error(tmp_path / "bad.csv", f"sep={sep}\n" + "\n".join(sep.join(r) for r in rows) + "\n",
                           "line 6: column 'f0' value 'x' is not a number")


def test_a_quoted_comma_in_a_semicolon_header_is_not_the_delimiter(tmp_path):
    """A header row holding a comma only inside a quoted name ("temp, C") was read as comma-separated."""
    from cycle_optuna.data import read_file

    path = tmp_path / "de.csv"
    path.write_text('sample;label;"temp, C"\ns0;a;1,5\ns1;b;2\n')
    x, y, names = read_file(path, DataConfig())
    assert names == ("a", "b") and x[:, 0, 0].tolist() == [1.5, 2.0]


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_text("x")
    with pytest.raises(DataError, match=r"expected \.npz, \.csv, \.ts, \.arff, \.tsv, \.txt\)"):
        load_task(DataConfig(), 0, data_path=path)


# --- .ts (UCR/UEA archive format), lengths, missing values, test_source ---------------------------

UNIVARIATE_TS = """# a comment line
@problemName Tiny
@timeStamps false
@missing false
@univariate true
@equalLength true
@seriesLength 4
@classLabel true 2 10 1
@data
1,2,3,4:10
2,3,4,5:2
0,0,1,1:1
1,1,0,0:2
5,4,3,2:10
1,0,1,0:1
"""

MULTIVARIATE_TS = """@problemname Motion
@timestamps false
@missing true
@univariate false
@dimensions 2
@equallength false
@classlabel true walk run
@data
1,2,3:10,20,30:run
4,?,6,7:40,50,60,70:walk
1,1:2,2:run
?,3:4,?:walk
"""


def _ts(tmp_path: Path, text: str, name: str = "a.ts") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_ts_univariate_labels_in_numeric_order(tmp_path):
    from cycle_optuna.data import load_ts, read_file

    x, labels, declared = load_ts(_ts(tmp_path, UNIVARIATE_TS))
    assert x.shape == (6, 4, 1) and labels[0] == "10" and declared == ["2", "10", "1"]
    np.testing.assert_array_equal(x[0, :, 0], [1, 2, 3, 4])
    x, y, names = read_file(tmp_path / "a.ts", DataConfig())
    assert names == ("1", "2", "10")  # numeric order, not the declared or the string order
    assert y.tolist() == [2, 1, 0, 1, 2, 0]


def test_ts_percent_comment_lines_are_skipped(tmp_path):
    from cycle_optuna.data import load_ts

    # as in files the aeon wheel ships (UnitTest): ARFF-style '%' comments, also before any '@' line
    text = "% a cut-down problem\n%\n" + UNIVARIATE_TS.replace("@data\n", "@data\n% the cases\n")
    x, labels, declared = load_ts(_ts(tmp_path, text))
    assert x.shape == (6, 4, 1) and labels[0] == "10" and declared == ["2", "10", "1"]


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    from cycle_optuna.data import load_ts, read_file

    ts = tmp_path / "bom.ts"
    ts.write_bytes(b"\xef\xbb\xbf" + UNIVARIATE_TS.replace("# a comment line\n", "").encode())
    assert load_ts(ts)[0].shape == (6, 4, 1)
    csv = tmp_path / "bom.csv"  # as spreadsheet programs save "CSV UTF-8"
    csv.write_bytes(b"\xef\xbb\xbfsample,label,f0\ns0,a,1\ns1,b,2\n")
    assert read_file(csv, DataConfig())[2] == ("a", "b")


def test_a_latin1_file_keeps_its_labels_apart(tmp_path):
    from cycle_optuna.data import read_file

    # a spreadsheet's "ANSI" export: not UTF-8; decoding with replacement would merge café and cafè
    path = tmp_path / "l1.csv"
    path.write_bytes("sample,label,f0\ns0,café,1\ns1,cafè,2\ns2,thé,3\n".encode("latin-1"))
    assert read_file(path, DataConfig())[2] == ("cafè", "café", "thé")  # sorted



def test_labels_that_differ_only_in_unicode_composition_are_one_class(tmp_path):
    from cycle_optuna.data import read_file

    composed, decomposed = "caf\u00e9", "cafe\u0301"  # both print as café
    train = tmp_path / "train.csv"
    train.write_text(f"sample,label,f0\ns0,{composed},1\ns1,{decomposed},2\ns2,th\u00e9,3\n")
    x, y, names = read_file(train, DataConfig())
    assert names == (composed, "th\u00e9") and y.tolist() == [0, 0, 1]
    test = tmp_path / "test.csv"  # the other form in the test file: the training file's class
    test.write_text(f"sample,label,f0\ns0,{decomposed},1\n")
    assert read_file(test, DataConfig(), classes=names)[1].tolist() == [0]
    ts = tmp_path / "u.ts"  # .ts: declared classes and labels alike
    ts.write_text(f"@problemName u\n@univariate true\n@equalLength true\n@classLabel true {decomposed} the\n@data\n"
                  f"1,2,3:{composed}\n3,2,1:the\n1,1,1:{decomposed}\n2,2,2:the\n")
    x, y, names = read_file(ts, DataConfig())
    assert names == (composed, "the") and y.tolist() == [0, 1, 0, 1]
    from cycle_optuna.data import read_file

    # the UCR archive's .tsv: no header, label then values; NaN pads a shorter series; labels -1/1
    train = tmp_path / "X_TRAIN.tsv"
    train.write_text("1\t0.5\t1.5\t2.5\n-1\t3\tNaN\t4\n\n1\t1\t2\tNaN\n-1\t5\t6\t7\n")
    x, y, names = read_file(train, DataConfig())
    assert names == ("-1", "1") and y.tolist() == [1, 0, 1, 0]
    assert x.shape == (4, 3, 1)
    np.testing.assert_array_equal(x[0, :, 0], [0.5, 1.5, 2.5])
    assert np.isnan(x[1, 1, 0]) and not np.isnan(x[1, 2, 0])  # a missing value inside the series stays
    assert np.isnan(x[2, 2, 0])  # trailing NaN: padding
    test = tmp_path / "X_TEST.tsv"
    test.write_text("1\t1\t2\t3\t4\n")  # a longer test series; only one class
    d = load_task(DataConfig(folds=1, val_fraction=0.5), 0, data_path=train, test_path=test)
    assert d.class_names == ("-1", "1") and d.y_test.tolist() == [1] and d.seq_len == 4


@pytest.mark.parametrize(("text", "needle"), [
    ("1\t0.5\t1.5\n2\t0.5\tabc\n", "line 2: column 3 value 'abc' is not a number"),
    ("1\t0.5\t1.5\n2\n", "line 2: a label and no values"),
    ("1,0.5,1.5\n2,0.5,1\n", "line 1: a label and no values (expected tab-separated"),
    ("0.5\t1\t2\n1\t2\t3\n", "line 1: label '0.5' is not a class"),
    ("1\t0.5\t1.5\nN/A\t0.5\t1\n", "line 2: missing label ('N/A')"),
    ("", "no data rows"),
])
def test_ucr_tsv_errors(tmp_path, text, needle):
    _assert_one_line_error(tmp_path / "bad.tsv", text, needle)


def test_ucr_txt_is_the_table_separated_by_spaces(tmp_path):
    from cycle_optuna.data import read_file

    # the archive's .txt files: label first, values in scientific notation, runs of spaces
    path = tmp_path / "X_TRAIN.txt"
    path.write_text("   2.0000000e+00   5.0000000e-01  -1.5e+00  NaN\n   1.0000000e+00   3  NaN   4\n")
    x, y, names = read_file(path, DataConfig())
    assert names == ("1", "2") and y.tolist() == [1, 0] and x.shape == (2, 3, 1)
    np.testing.assert_array_equal(x[0, :2, 0], [0.5, -1.5])
    assert np.isnan(x[0, 2, 0]) and np.isnan(x[1, 1, 0]) and x[1, 2, 0] == 4
    _assert_one_line_error(tmp_path / "bad.txt", "1 0.5 1.5\n2 0.5 abc\n", "line 2: column 3 value 'abc' is not a number")
    _assert_one_line_error(tmp_path / "bad.txt", "1\t0.5\n2\n", "line 2: a label and no values (expected space-separated")


UNIVARIATE_ARFF = """% a comment
@relation Tiny
@attribute att0 numeric
@attribute att1 NUMERIC
@attribute 'att 2' real
@attribute target {b,'a',10}

@DATA
1,2,3,b
4,?,6,'a'
7,8,?,10
"""

MULTIVARIATE_ARFF = """@relation 'Tiny'
@attribute relationalAtt relational
@attribute att0 numeric
@attribute att1 numeric
@attribute att2 numeric
@end relationalAtt
@attribute activity {walk,run}
@data
'1,2,3\\n10,20,30',walk
"4,?,6\\n40,50,60",run
'7,8,?\\n70,80,?',walk
"""


def test_arff_univariate_padding_missing_and_declared_order(tmp_path):
    from cycle_optuna.data import load_arff, read_file

    path = tmp_path / "X_TRAIN.arff"
    path.write_text(UNIVARIATE_ARFF)
    x, labels, declared = load_arff(path)
    assert declared == ["b", "a", "10"] and labels == ["b", "a", "10"]  # quotes dropped
    assert x.shape == (3, 3, 1)
    np.testing.assert_array_equal(x[0, :, 0], [1, 2, 3])
    assert np.isnan(x[1, 1, 0]) and x[1, 2, 0] == 6  # '?' inside a series: one missing value
    assert np.isnan(x[2, 2, 0])  # trailing '?': padding
    assert read_file(path, DataConfig())[2] == ("b", "a", "10")  # names that are not all numbers: declared order


def test_arff_header_words_separated_by_tabs_read_as_by_blanks(tmp_path):
    from cycle_optuna.data import load_arff

    path = tmp_path / "X_TRAIN.arff"
    path.write_text(UNIVARIATE_ARFF)
    tabbed = tmp_path / "T_TRAIN.arff"
    tabbed.write_text("\n".join(ln.replace(" ", "\t", 2) if ln.lower().startswith(("@attribute", "@relation")) else ln
                                for ln in UNIVARIATE_ARFF.splitlines()) + "\n")
    assert "\t" in tabbed.read_text()
    (x, labels, declared), (x2, labels2, declared2) = load_arff(path), load_arff(tabbed)
    np.testing.assert_array_equal(x, x2)
    assert (labels, declared) == (labels2, declared2)


def test_arff_quoted_class_labels_may_hold_commas(tmp_path):
    """A quoted label with a comma ('a,b', as Weka writes a nominal value) was cut at its comma: the
    row's last number read as "'a" and the file refused."""
    from cycle_optuna.data import read_file

    path = tmp_path / "q.arff"
    path.write_text("@relation q\n@attribute t0 numeric\n@attribute t1 numeric\n"
                    "@attribute target {'a,b', \"c d\", e}\n@data\n1,2,'a,b'\n3,4,\"c d\"\n5,6,e\n7,8, 'a,b'\n")
    x, y, names = read_file(path, DataConfig())
    assert names == ("a,b", "c d", "e") and y.tolist() == [0, 1, 2, 0]
    np.testing.assert_array_equal(x[:, :, 0], [[1, 2], [3, 4], [5, 6], [7, 8]])
    path.write_text("@relation q\n@attribute t0 numeric\n@attribute target {don't,do}\n@data\n1,don't\n2,do\n")
    assert read_file(path, DataConfig())[2] == ("don't", "do")  # a quote inside a bare value is a letter


def test_arff_multivariate_relational_matches_the_ts_file(tmp_path):
    from cycle_optuna.data import read_file

    path = tmp_path / "m.arff"
    path.write_text(MULTIVARIATE_ARFF)
    x, y, names = read_file(path, DataConfig())
    assert names == ("walk", "run") and y.tolist() == [0, 1, 0] and x.shape == (3, 3, 2)
    np.testing.assert_array_equal(x[0], [[1, 10], [2, 20], [3, 30]])
    assert np.isnan(x[1, 1, 0]) and x[1, 1, 1] == 50
    assert np.isnan(x[2, 2]).all()  # a step missing in every dimension at the end: padding
    ts = tmp_path / "m.ts"
    ts.write_text("@problemName Tiny\n@univariate false\n@dimensions 2\n@classLabel true walk run\n@data\n"
                  "1,2,3:10,20,30:walk\n4,?,6:40,50,60:run\n7,8:70,80:walk\n")
    xt, yt, names_t = read_file(ts, DataConfig())
    np.testing.assert_array_equal(x, xt)
    assert yt.tolist() == y.tolist() and names_t == names


def test_arff_test_source_maps_labels_like_the_training_file(tmp_path):
    train = tmp_path / "X_TRAIN.arff"
    train.write_text(UNIVARIATE_ARFF.replace("@DATA\n", "@DATA\n" + "1,2,3,b\n4,5,6,a\n7,8,9,10\n" * 3))
    test = tmp_path / "X_TEST.arff"
    test.write_text(UNIVARIATE_ARFF.replace("{b,'a',10}", "{10,a,b}"))  # the same classes, declared in another order
    d = load_task(DataConfig(folds=1, val_fraction=0.2), 0, data_path=train, test_path=test)
    assert d.class_names == ("b", "a", "10") and d.y_test.tolist() == [0, 1, 2]
    test.write_text(UNIVARIATE_ARFF.replace("{b,'a',10}", "{b,a,11}").replace(",10\n", ",11\n"))
    with pytest.raises(DataError, match="class set differs from the training file's: the class attribute declares"):
        load_task(DataConfig(folds=1, val_fraction=0.2), 0, data_path=train, test_path=test)


@pytest.mark.parametrize(("edit", "needle"), [
    (("{b,'a',10}", "numeric"), "the last attribute 'target' is the class and must be nominal"),
    ((",'a'\n", ",c\n"), "line 10: class label 'c' is not declared by the class attribute target (b, a, 10)"),
    (("4,?,6", "4,x,6"), "line 10: value 'x' is not a number (missing values are '?')"),
    (("4,?,6", "4,,6"), "line 10: value '' is not a number (missing values are '?')"),
    (("4,?,6", "4,6"), "line 10: 3 values, the header declares 4 attributes"),
    (("@DATA", "@dta"), "line 8: unknown header '@dta'"),
    (("@DATA\n", ""), "line 8: data before the @data line"),
    (("1,2,3,b", "{0 1, 3 b}"), "line 9: sparse ARFF rows are not supported"),
    (("@attribute att1 NUMERIC", "@attribute att1 string"), "attribute 'att1' has type 'string'"),
    (("{b,'a',10}", "{b}"), "needs two or more distinct labels"),
])
def test_arff_errors(tmp_path, edit, needle):
    _assert_one_line_error(tmp_path / "bad.arff", UNIVARIATE_ARFF.replace(*edit), needle)


def test_arff_multivariate_ragged_dimensions(tmp_path):
    _assert_one_line_error(tmp_path / "bad.arff", MULTIVARIATE_ARFF.replace("'1,2,3\\n10,20,30'", "'1,2,3\\n10,20'"),
                           "line 9: ragged dimensions: 2 dimension(s) of 3/2 values")


def test_ts_multivariate_unequal_length_and_missing(tmp_path):
    from cycle_optuna.data import read_file

    x, y, names = read_file(_ts(tmp_path, MULTIVARIATE_TS), DataConfig())
    assert names == ("walk", "run") and y.tolist() == [1, 0, 1, 0]  # non-numeric names: declared order
    assert x.shape == (4, 4, 2)  # padded to the longest series
    np.testing.assert_array_equal(x[0, :3], [[1, 10], [2, 20], [3, 30]])
    assert np.isnan(x[0, 3]).all() and np.isnan(x[2, 2:]).all()  # padding: the whole step is NaN
    assert np.isnan(x[1, 1, 0]) and x[1, 1, 1] == 50  # '?' is one missing value
    assert np.isnan(x[3, 0, 0]) and np.isnan(x[3, 1, 1])


def test_missing_values_masked_and_filled(tmp_path):
    path = _ts(tmp_path, MULTIVARIATE_TS.replace("@data", "@data\n" + "1,2,3:10,20,30:run\n4,5:40,50:walk\n" * 3))
    d = load_task(DataConfig(val_fraction=0.2, test_fraction=0.2), 0, data_path=path)
    xs = torch.cat([d.x_train, d.x_val, d.x_test])
    steps_nan = torch.isnan(xs).all(-1)
    partial = torch.isnan(xs).any(-1) & ~steps_nan
    assert steps_nan.any() and not partial.any()  # padding stays NaN for the model's mask; partial gaps filled
    # NaN-free statistics from observed values only
    assert np.isfinite(d.mean).all() and np.isfinite(d.std).all()


def test_stats_ignore_missing_values():
    from cycle_optuna.data import train_stats

    x = np.array([[[1.0], [3.0], [np.nan]], [[5.0], [np.nan], [np.nan]]], dtype=np.float32)
    mean, std = train_stats(x)
    assert mean[0] == pytest.approx(3.0) and std[0] == pytest.approx(np.std([1, 3, 5]))


def test_npz_lengths_mask_the_tail(tmp_path):
    x, y = _toy(30, t=6)
    lengths = np.arange(30) % 6 + 1
    path = tmp_path / "v.npz"
    np.savez(path, X=x, y=y, lengths=lengths)
    d = load_task(DataConfig(folds=1), 0, data_path=path)
    xs = torch.cat([d.x_train, d.x_val, d.x_test])
    observed = (~torch.isnan(xs).all(-1)).sum(1)
    assert sorted(observed.tolist()) == sorted(lengths.tolist())
    assert not torch.isnan(xs).any(-1).logical_and(~torch.isnan(xs).all(-1)).any()
    # statistics use only the steps within each length
    from cycle_optuna.data import stratified_split, train_stats
    tr, _, _ = stratified_split(path, y, 3, 0.15, 0.15, 0)
    masked = x.copy()
    masked[np.arange(6)[None, :] >= lengths[:, None]] = np.nan
    np.testing.assert_allclose(d.mean, train_stats(masked[tr])[0], rtol=1e-6)


@pytest.mark.parametrize(("lengths", "needle"), [
    (np.r_[np.arange(29) % 6 + 1, 7], "lengths[29] = 7 is out of range 1..6"),
    (np.r_[0, np.arange(29) % 6 + 1], "lengths[0] = 0 is out of range 1..6"),
    (np.arange(29) % 6 + 1, "lengths must be 1-D with len N=30"),
    (np.full(30, 2.5), "lengths must hold integers"),
])
def test_npz_lengths_errors(tmp_path, lengths, needle):
    x, y = _toy(30, t=6)
    path = tmp_path / "v.npz"
    np.savez(path, X=x, y=y, lengths=lengths)
    with pytest.raises(DataError) as e:
        load_task(DataConfig(), 0, data_path=path)
    assert str(path) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_csv_unequal_lengths_are_padded(tmp_path):
    path = tmp_path / "r.csv"
    rows = ["sample,label,f0"] + [f"s{i},{i % 2},{step}" for i in range(20) for step in range(2 + i % 3)]
    path.write_text("\n".join(rows))
    x, y, _ = __import__("cycle_optuna.data", fromlist=["read_file"]).read_file(path, DataConfig())
    assert x.shape == (20, 4, 1)
    assert np.isnan(x[0, 2:]).all() and not np.isnan(x[2]).any()


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda t: t.replace("@missing false", "@colour blue"), "line 4: unknown header '@colour'"),
    (lambda t: t.replace("1,0,1,0:1", "1,0,1,0:0:1"), "line 15: ragged dimensions: 2 dimension(s), expected 1"),
    (lambda t: t.replace("1,0,1,0:1", "1,0,1,0:3"), "class label '3' is not declared in @classLabel"),
    (lambda t: t.replace("1,0,1,0:1", "1,0,1:1"), "line 15: 3 values, but @equalLength true with @seriesLength 4"),
    (lambda t: t.replace("1,0,1,0:1", "1,x,1,0:1"), "line 15: dimension 1 value 'x' is not a number"),
    (lambda t: t.replace("1,0,1,0:1", "1,,1,0:1"), "line 15: dimension 1 value '' is not a number"),
    (lambda t: t.replace("@seriesLength 4\n", "").replace("1,0,1,0:1", "1,0,1:1"),
     "line 14: 3 values, but @equalLength true and the first series has 4"),
    (lambda t: t.replace("@timeStamps false", "@timeStamps true"), "@timeStamps true is not supported"),
    (lambda t: t.replace("@classLabel true 2 10 1", "@targetLabel true"), "regression file"),
    (lambda t: t.replace("@classLabel true 2 10 1\n", ""), "no @classLabel header"),
    (lambda t: t.replace("@data\n", ""), "data before the @data line"),
    (lambda t: t.split("@data")[0] + "@data\n", "no data rows"),
    # str.isdigit() takes '²' as a digit, int() does not: a one-line error, not a ValueError
    (lambda t: t.replace("@seriesLength 4", "@seriesLength \u00b2"), "@serieslength must be a positive integer"),
])
def test_ts_errors(tmp_path, edit, needle):
    path = _ts(tmp_path, edit(UNIVARIATE_TS))
    with pytest.raises(DataError) as e:
        load_task(DataConfig(), 0, data_path=path)
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_ts_ragged_dimensions_within_a_series(tmp_path):
    path = _ts(tmp_path, MULTIVARIATE_TS.replace("1,1:2,2:run", "1,1:2,2,2:run"))
    with pytest.raises(DataError, match=r"line 11: ragged dimensions: dimension 1 has 2 values, dimension 2 has 3"):
        load_task(DataConfig(), 0, data_path=path)


def _split_files(tmp_path, n_train=60, n_test=30, t=5, f=3):
    x, y = _toy(n_train + n_test, t=t, f=f)
    x[:, 0, 0] = np.arange(n_train + n_test)  # a row id, to trace rows through the split
    train = _write_npz(tmp_path / "train.npz", x[:n_train], y[:n_train])
    test = _write_npz(tmp_path / "test.npz", x[n_train:], y[n_train:])
    return x, y, train, test


def test_test_source_is_the_test_split_and_val_comes_from_train_only(tmp_path):
    x, y, train, test = _split_files(tmp_path)
    d = load_task(DataConfig(val_fraction=0.2), 0, data_path=train, test_path=test)

    def ids(t):
        return set(np.round(t[:, 0, 0].numpy() * d.std[0] + d.mean[0]).astype(int).tolist())

    assert ids(d.x_test) == set(range(60, 90))  # exactly the test file, in its order
    np.testing.assert_array_equal(d.y_test.numpy(), y[60:])
    assert ids(d.x_train) | ids(d.x_val) == set(range(60))
    assert not ids(d.x_train) & ids(d.x_val)
    assert torch.bincount(d.y_val).tolist() == [4, 4, 4]  # stratified, 20% of each training class
    # statistics from the training split only: changing the test file changes no training value
    x2 = x.copy()
    x2[60:] = 1e3
    test2 = _write_npz(tmp_path / "test2.npz", x2[60:], y[60:])
    d2 = load_task(DataConfig(val_fraction=0.2), 0, data_path=train, test_path=test2)
    np.testing.assert_array_equal(d.mean, d2.mean)
    assert torch.equal(d.x_train, d2.x_train) and torch.equal(d.x_val, d2.x_val)


def test_a_study_that_ran_on_two_spellings_of_a_label_is_read_as_it_ran(tmp_path):
    from cycle_optuna.data import as_it_ran

    path = tmp_path / "a.csv"
    path.write_text("sample,label,f0\n" + "".join(f"s{i},{lab},{i}\n" for i, lab in enumerate(["7", "007", "x"] * 6)))
    with pytest.raises(DataError, match="are the same integer"):
        load_task(DataConfig(folds=1), 0, data_path=path)
    with as_it_ran():
        assert load_task(DataConfig(folds=1), 0, data_path=path).class_names == ("7", "x")


def test_integral_float_spellings_of_a_label_stay_one_class(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("sample,label,f0\n" + "".join(f"s{i},{lab},{i}\n" for i, lab in enumerate(["1", "1.0", "2", "2.00"] * 5)))
    d = load_task(DataConfig(folds=1, val_fraction=0.2, test_fraction=0.2), 0, data_path=path)
    assert d.class_names == ("1", "2")


@pytest.mark.parametrize("labels", [["run", "walk"], ["1", "2"]])
def test_an_npz_test_file_beside_named_classes_is_refused(tmp_path, labels):
    """An .npz's y holds indices: which training class each stands for would be a guess."""
    x, y = _toy(k=2)
    train = _write_csv(tmp_path / "train.csv", x[:, :, :2], np.array(labels)[y])
    test = _write_npz(tmp_path / "test.npz", x[:10, :, :2], y[:10])
    with pytest.raises(DataError, match=r"test\.npz: an \.npz's y holds class indices, and the classes of the training "
                       r"file .*train\.csv are names \('(run|1)', '(walk|2)'\)"):
        load_task(DataConfig(), 0, data_path=train, test_path=test)
    from cycle_optuna.data import as_it_ran

    with as_it_ran():  # a study that ran on these files is read as it ran: y indexes the training classes
        assert load_task(DataConfig(), 0, data_path=train, test_path=test).y_test.tolist() == y[:10].tolist()
    indices = _write_csv(tmp_path / "indices.csv", x[:, :, :2], y)  # classes 0..K-1: the indices are the names
    assert load_task(DataConfig(), 0, data_path=indices, test_path=test).y_test.tolist() == y[:10].tolist()


@pytest.mark.parametrize("where", ["test", "val"])
def test_a_value_beyond_32_bit_floats_once_normalised_is_named(tmp_path, where):
    """Finite as read, inf once scaled by the training spread: every loss would be NaN, unexplained."""
    x, y = _toy(n=60)
    x = x * 0.01
    if where == "test":
        big = x[:10].copy()
        big[2, 3, 0] = 1e37
        test = _write_npz(tmp_path / "test.npz", big, y[:10])
        with pytest.raises(DataError, match=r"test\.npz: series 3 \(in file order\), step 4, feature 1: value 1e\+37 "):
            load_task(DataConfig(), 0, data_path=_write_npz(tmp_path / "a.npz", x, y), test_path=test)
    else:
        cfg = DataConfig(folds=1)
        _, rows_va, _ = stratified_split("a", y, 3, cfg.val_fraction, cfg.test_fraction, 0)  # load_task's split
        x[rows_va[0], 3, 0] = 3e38
        with pytest.raises(DataError, match=rf"a\.npz: series {rows_va[0] + 1} \(in file order\), step 4, feature 1"):
            load_task(cfg, 0, data_path=_write_npz(tmp_path / "a.npz", x, y))


def test_test_source_ts_maps_labels_like_the_training_file(tmp_path):
    train = _ts(tmp_path, UNIVARIATE_TS, "TRAIN.ts")
    # the test file declares its labels in another order and holds longer series
    test = _ts(tmp_path, UNIVARIATE_TS.replace("@classLabel true 2 10 1", "@classLabel true 1 2 10")
               .replace("@equalLength true\n@seriesLength 4", "@equalLength false")
               .replace("1,2,3,4:10", "1,2,3,4,5:10"), "TEST.ts")
    d = load_task(DataConfig(val_fraction=0.3), 0, data_path=train, test_path=test)
    assert d.class_names == ("1", "2", "10")
    assert d.y_test.tolist() == [2, 1, 0, 1, 2, 0]
    assert d.seq_len == 5 and torch.isnan(d.x_train[:, 4]).all()  # both padded to the longer length


def test_csv_labels_are_names_and_a_test_file_maps_them_by_name(tmp_path):
    from cycle_optuna.data import read_file

    rows = [f"s{i},{lab},{i}" for i, lab in enumerate(["walk", "run", "sit", "run", "walk", "sit"])]
    train = tmp_path / "train.csv"
    train.write_text("sample,label,f0\n" + "\n".join(rows))
    x, y, names = read_file(train, DataConfig())
    assert names == ("run", "sit", "walk")  # sorted: the same order whatever the row order
    assert y.tolist() == [2, 0, 1, 0, 2, 1]
    test = tmp_path / "test.csv"
    test.write_text("sample,label,f0\nt0,sit,1\nt1,walk,2\n")  # a class may be absent from a test file
    _, y_test, test_names = read_file(test, DataConfig(), classes=names)
    assert test_names == names and y_test.tolist() == [1, 2]
    test.write_text("sample,label,f0\nt0,sit,1\nt1,jump,2\nt2,fly,3\n")
    with pytest.raises(DataError, match=r"test\.csv: class\(es\) fly, jump not in the training file's classes "
                       r"\(run, sit, walk\)"):
        read_file(test, DataConfig(), classes=names)
    # numbers are names too, in numeric order: 1..K (as many archives write them), -1/1, 1.0 == 1
    train.write_text("sample,label,f0\ns0,1,0\ns1,10,1\ns2,2.0,2\ns3,-1,3\n")
    x, y, names = read_file(train, DataConfig())
    assert names == ("-1", "1", "2", "10") and y.tolist() == [1, 3, 2, 0]


def test_inf_is_a_class_name_not_a_number_that_is_no_class(tmp_path):
    """'inf' and 'Infinity' parse as floats, so they were refused as "not a class: labels are integers
    or names" (a pair of classes inf/sup, say); they are names, as any word."""
    from cycle_optuna.data import read_file

    path = tmp_path / "a.csv"
    path.write_text("sample,label,f0\n" + "".join(f"s{i},{lab},{i}\n" for i, lab in enumerate(["inf", "sup", "Infinity"])))
    _, y, names = read_file(path, DataConfig())
    assert names == ("Infinity", "inf", "sup") and y.tolist() == [1, 2, 0]


def test_npz_test_file_may_lack_a_class(tmp_path):
    x, y, train, _ = _split_files(tmp_path)
    keep = y[60:] != 2
    test = _write_npz(tmp_path / "test.npz", x[60:][keep], y[60:][keep])  # a small test file: no series of class 2
    d = load_task(DataConfig(), 0, data_path=train, test_path=test)
    assert d.n_classes == 3 and d.y_test.tolist() == y[60:][keep].tolist()


@pytest.mark.parametrize(("which", "needle"), [
    ("features", "test.npz: 2 feature(s) per step, but the training file"),
    ("classes", "test.npz: class set differs from the training file's: labels 3, 4 here, 0..2"),  # every one, not the largest
    ("ts_classes", "TEST.ts: class set differs from the training file's"),
])
def test_test_source_mismatch(tmp_path, which, needle):
    if which == "ts_classes":
        train = _ts(tmp_path, UNIVARIATE_TS, "TRAIN.ts")
        test = _ts(tmp_path, UNIVARIATE_TS.replace("true 2 10 1", "true 2 10 1 7"), "TEST.ts")
    else:
        x, y, train, test = _split_files(tmp_path)
        if which == "features":
            test = _write_npz(tmp_path / "test.npz", x[60:, :, :2], y[60:])
        else:
            test = _write_npz(tmp_path / "test.npz", x[60:], y[60:] + 2)
    with pytest.raises(DataError) as e:
        load_task(DataConfig(), 0, data_path=train, test_path=test)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_pipe_as_a_data_file_is_refused_not_read(tmp_path):
    from cycle_optuna.data import read_inputs

    fifo = tmp_path / "new.csv"
    os.mkfifo(fifo)  # `predict STUDY new.csv` would block until a writer came
    with pytest.raises(DataError, match=r"new\.csv: not a regular file"):
        read_inputs(fifo, DataConfig(), ("a", "b"))


def _long_rows(sep: str = ",") -> list[str]:
    """6 series of 3 steps, 1 feature: series i holds i*10 + step; classes a, b alternate."""
    return [sep.join((str(i), "ab"[i % 2], str(i * 10 + t))) for i in range(6) for t in range(3)]


@pytest.mark.parametrize("header, rows", [
    (",sample,label,x", [f"{k},{r}" for k, r in enumerate(_long_rows())]),          # pandas to_csv()
    ('"","sample","label","x"', [f'"{k + 1}",{r}' for k, r in enumerate(_long_rows())]),  # R write.csv
])
def test_a_row_index_column_is_refused_not_read_as_a_feature(tmp_path, header, rows):
    from cycle_optuna.data import read_file

    path = tmp_path / "d.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    with pytest.raises(DataError, match=r"d\.csv: column 1 has no name in the header \(a row index"):
        read_file(path, DataConfig())


def test_values_that_a_csv_reader_must_not_lose(tmp_path):
    """A trailing delimiter adds no feature; NA is missing; integer labels stay exact and distinct;
    UTF-16 text (Excel's "Unicode text") reads as UTF-8 does."""
    from cycle_optuna.data import read_file

    rows = _long_rows()
    rows[4] = "1,b,NA"  # series 1, step 1: missing (R writes NA)
    big = {"a": "9007199254740993", "b": "9007199254740992"}  # 2**53 + 1 and 2**53: one float
    text = "\n".join(["sample,label,x,", *(f"{r.replace(',a,', ',' + big['a'] + ',').replace(',b,', ',' + big['b'] + ',')},"
                                          for r in rows)]) + "\n"
    for name, data in (("u8.csv", text.encode()), ("u16.csv", text.encode("utf-16"))):
        (tmp_path / name).write_bytes(data)
        x, y, names = read_file(tmp_path / name, DataConfig())
        assert x.shape == (6, 3, 1) and names == (big["b"], big["a"])
        assert np.isnan(x[1, 1, 0]) and x[2, 2, 0] == 22.0
        assert y.tolist() == [1, 0, 1, 0, 1, 0]


def test_a_row_per_series_read_as_a_row_per_step_says_to_set_wide(tmp_path):
    from cycle_optuna.data import read_file

    path = tmp_path / "d.csv"
    path.write_text("sample,label,t0,t1,t2\n" + "\n".join(f"{i},{'ab'[i % 2]},{i},{i},{i}" for i in range(6)) + "\n")
    with pytest.raises(DataError, match=r"every sample has a single row.* set \[data\] layout = \"wide\""):
        read_file(path, DataConfig())
    x, _, _ = read_file(path, DataConfig(layout="wide"))
    assert x.shape == (6, 3, 1)


def test_a_tsv_line_with_an_empty_label_cell_is_refused_not_shifted(tmp_path):
    from cycle_optuna.data import read_file

    path = tmp_path / "d_TRAIN.tsv"
    path.write_text("1\t0.5\t0.25\n\t0.5\t0.25\n2\t0.1\t0.2\n")
    with pytest.raises(DataError, match=r"line 2: empty label"):
        read_file(path, DataConfig())


def test_a_class_written_1_0_in_one_file_and_1_in_another_is_one_class(tmp_path):
    """.ts keeps declared labels as written (`0.0 1.0`, as Covid3Month_disc's); a .csv reads `0.0` as `0`."""
    from cycle_optuna.data import read_file, read_inputs

    path = tmp_path / "t.csv"
    path.write_text("sample,label,x\n" + "\n".join(f"{i},{i % 2},{i}.5" for i in range(4)) + "\n")
    x, y, names = read_file(path, DataConfig(), classes=("0.0", "1.0"))
    assert names == ("0.0", "1.0") and y.tolist() == [0, 1, 0, 1]
    assert read_inputs(path, DataConfig(), ("0.0", "1.0"))[1].tolist() == [0, 1, 0, 1]
    ts = tmp_path / "t.ts"
    ts.write_text("@problemName t\n@univariate true\n@classLabel true 0.0 1.0\n@data\n1,2,3:0.0\n2,3,4:1.0\n")
    assert read_file(ts, DataConfig(), classes=("0", "1"))[1].tolist() == [0, 1]


@pytest.mark.parametrize("declared, used", [("a b c", "a c"), ("1 2 3", "1 2")])
def test_a_training_file_that_declares_a_class_no_series_has_names_it(tmp_path, declared, used):
    from cycle_optuna.data import read_file

    path = tmp_path / "t.ts"
    rows = [f"{k},{k + 1},{k + 2}:{label}" for k, label in enumerate(used.split() * 2)]
    path.write_text(f"@problemName t\n@univariate true\n@classLabel true {declared}\n@data\n" + "\n".join(rows) + "\n")
    missing = sorted(set(declared.split()) - set(used.split()))
    with pytest.raises(DataError, match=rf"class\(es\) {missing[0]} declared but no series has them"):
        read_file(path, DataConfig())


def test_a_wide_column_counting_the_rows_is_refused_as_an_id_not_read_as_step_0(tmp_path):
    from cycle_optuna.data import read_file

    path = tmp_path / "w.csv"
    path.write_text("id,label,t0,t1,t2\n" + "\n".join(f"{100 + i},{'ab'[i % 2]},0,0.5,{i / 4}" for i in range(6)) + "\n")
    with pytest.raises(DataError, match=r"column 'id' counts the rows \(100, 101, \.\.\.\): an id"):
        read_file(path, DataConfig(layout="wide"))
    x, _, _ = read_file(path, DataConfig(layout="wide", sample_column="id"))
    assert x.shape == (6, 3, 1)


def test_a_data_file_that_cannot_be_read_for_its_digest_is_a_data_error():
    """`best` and held_out_score compare the data file with the study's digest of it: a file this
    user cannot read (here /proc/self/mem, a regular file whose read fails with EIO even for root)
    is the data checks' one line, which `best` shows as "test accuracy unavailable"."""
    from cycle_optuna import digests

    with pytest.raises(DataError, match=r"/proc/self/mem: cannot read data file: Input/output error"):
        digests.sha256(Path("/proc/self/mem"))


def test_a_training_file_too_small_to_validate_says_what_would_help(tmp_path):
    """With a test file, two series (one a class) leave nothing to validate on; "folds = 5" would
    not help either (it takes 10), so the message says to add series instead."""
    def write(name: str, n: int) -> Path:
        rows = [f"s{i},{'ab'[i % 2]},{t * 0.1 + i}" for i in range(n) for t in range(5)]
        (tmp_path / name).write_text("sample,label,f0\n" + "\n".join(rows) + "\n")
        return tmp_path / name

    train, test = write("tr.csv", 2), write("te.csv", 4)
    for folds in (1, "auto"):
        with pytest.raises(DataError, match=r"tr\.csv: the validation split is empty.*with 2 series there are too "
                                            r"few to cross-validate either \(5 folds take 10\): add series"):
            load_task(DataConfig(folds=folds), 0, data_path=train, test_path=test)


@pytest.mark.parametrize("text", ["", " \n", "\n\n", " , \n1,2\n"])
def test_a_blank_csv_is_empty(tmp_path, text):
    path = tmp_path / "blank.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=r"blank\.csv: empty csv file \(expected a header row\)"):
        load_task(DataConfig(), 0, data_path=path)


def test_a_feature_never_observed_is_named_by_its_place(tmp_path):
    path = tmp_path / "d.csv"
    rows = [f"s{i},{'ab'[i % 2]},{t + i},," for i in range(40) for t in range(5)]
    path.write_text("sample,label,f0,f1,f2\n" + "\n".join(rows) + "\n")
    path.write_text(path.read_text().replace(",,\n", ",,7\n"))  # f2 observed, f1 never
    with pytest.raises(DataError, match=r"d\.csv: feature 1 \(feature column 2 of 3 in file order, not counting the "
                                        r"sample and label columns\) has no observed value in the training split"):
        load_task(DataConfig(), 0, data_path=path)


def test_a_test_files_missing_column_is_renamed_not_the_key_changed(tmp_path):
    """The hint told a test file with 'Label' to set [data] label_column = 'Label', which the training
    file (with 'label') then failed on."""
    train, test = tmp_path / "tr.csv", tmp_path / "te.csv"
    train.write_text("sample,label,f0\ns0,a,1\ns0,a,2\ns1,b,3\ns1,b,4\n")
    test.write_text("sample,Label,f0\nt0,a,1\nt0,a,2\n")
    with pytest.raises(DataError, match=r"te\.csv: missing label_column column 'label' \(columns: sample, Label, f0\); "
                                        r"did you mean 'Label'\? name it 'label', as in the training file$"):
        load_task(DataConfig(), 0, data_path=train, test_path=test)
