"""`cycle-optuna predict` / predict_file: the best model on a new data file, labelled or not."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest

from cycle_optuna import api
from cycle_optuna.cli import main
from cycle_optuna.errors import DataError
from cycle_optuna.predict import predict_file
from workers_helpers import drop_synthetic_keys, write_study


def _rows(n: int, seed: int, steps: int = 6) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"s{i},{'ab'[i % 2]},{(i % 2) * 2 - 1 + rng.normal(0, 0.5) + 0.01 * t:.4f}"
            for i in range(n) for t in range(steps)]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A finished study of 2 cycles on a long .csv training file and its test file."""
    folder = tmp_path_factory.mktemp("predict")
    (folder / "train.csv").write_text("\n".join(["sample,label,f0", *_rows(40, 0)]) + "\n")
    (folder / "test.csv").write_text("\n".join(["sample,label,f0", *_rows(20, 1)]) + "\n")
    path = write_study(folder, n_trials=2, epochs=2)
    path.write_text(drop_synthetic_keys(path.read_text()).replace(
        "[data]\n", '[data]\nsource = "train.csv"\ntest_source = "test.csv"\n'))
    api.run_study(path)
    return path


def test_a_labelled_file_gets_the_held_out_accuracy_and_an_unlabelled_one_the_same_classes(study, tmp_path):
    test = study.parent / "test.csv"
    pred = predict_file(study, test)
    assert pred.classes == ("a", "b") and pred.ids == [f"s{i}" for i in range(20)]
    assert pred.labels.tolist() == [i % 2 for i in range(20)]
    assert pred.accuracy == pytest.approx(api.held_out_score(study).accuracy)
    np.testing.assert_allclose(pred.proba.sum(axis=1), 1.0, rtol=1e-5)
    # the same series without the label column, and as an .npz without y
    unlabelled = tmp_path / "new.csv"
    unlabelled.write_text("\n".join(["sample,f0", *(",".join(r.split(",")[::2]) for r in _rows(20, 1))]) + "\n")
    bare = predict_file(study, unlabelled)
    assert bare.labels is None and bare.accuracy is None
    np.testing.assert_allclose(bare.proba, pred.proba, rtol=1e-5)
    x = np.array([[float(r.split(",")[2])] for r in _rows(20, 1)]).reshape(20, 6, 1)
    np.savez(tmp_path / "new.npz", X=x)
    np.testing.assert_allclose(predict_file(study, tmp_path / "new.npz").proba, pred.proba, rtol=1e-4)


def test_csv_feature_columns_are_matched_by_name_not_position(tmp_path):
    """A .csv file's columns in another order are the same features (exports reorder columns); read
    by position they were silently other features. The test file is read the same way."""
    def rows(n: int, seed: int, order: tuple[str, str]) -> list[str]:
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            for t in range(5):
                value = {"temp": (i % 2) * 3 + rng.normal(0, 0.3), "load": 10 * t + rng.normal()}
                out.append(f"s{i},{'ab'[i % 2]},{value[order[0]]:.4f},{value[order[1]]:.4f}")
        return [f"sample,label,{order[0]},{order[1]}", *out]

    (tmp_path / "train.csv").write_text("\n".join(rows(30, 0, ("temp", "load"))) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(rows(10, 1, ("load", "temp"))) + "\n")
    path = write_study(tmp_path, n_trials=1, epochs=1)
    path.write_text(drop_synthetic_keys(path.read_text()).replace(
        "[data]\n", '[data]\nsource = "train.csv"\ntest_source = "test.csv"\n'))
    api.run_study(path)
    assert api.load_study(path).user_attrs[api.STATS_ATTR]["feature_names"] == ["temp", "load"]
    (tmp_path / "same.csv").write_text("\n".join(rows(10, 1, ("temp", "load"))) + "\n")
    swapped, same = predict_file(path, tmp_path / "test.csv"), predict_file(path, tmp_path / "same.csv")
    np.testing.assert_allclose(swapped.proba, same.proba, rtol=1e-6)
    assert swapped.accuracy == api.held_out_score(path).accuracy  # the test file was read by name too
    renamed = tmp_path / "renamed.csv"
    renamed.write_text((tmp_path / "same.csv").read_text().replace("sample,label,temp,load", "sample,label,temp,power"))
    with pytest.raises(DataError, match=r"missing feature column\(s\) 'load': the study was trained on temp, load"):
        predict_file(path, renamed)
    cased = tmp_path / "cased.csv"  # another case of the same name: said, not left to spot
    cased.write_text((tmp_path / "same.csv").read_text().replace("sample,label,temp,load", "sample,label,temp,Load"))
    with pytest.raises(DataError, match=r"missing feature column\(s\) 'load': the study was trained on temp, load "
                                        r"\('Load' is 'load'\? rename it as in the training file\)$"):
        predict_file(path, cased)


def test_values_the_model_overflows_on_are_named_not_predicted_as_nan(study, tmp_path, capsys):
    """1e20 is a float32 number, so the file's checks pass it, and the net's output was NaN: the CLI
    wrote `nan` probabilities and class 0, exit 0."""
    x = np.random.default_rng(0).normal(size=(5, 6, 1))
    x[3] = 1e20
    np.savez(tmp_path / "huge.npz", X=x)
    assert main(["predict", str(study), str(tmp_path / "huge.npz"), "-o", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: {tmp_path / 'huge.npz'}: series 3: the model's output is not finite (largest "
                           "|value| 1e+20, far outside the training data's range)")
    assert not (tmp_path / "p.csv").exists()
    model = api.load_best_model(study)
    with pytest.raises(DataError, match=r"^series 3: the model's output is not finite"):
        model.predict_proba(x)
    assert model.predict(x[:3]).shape == (3,)


@pytest.mark.parametrize("x", [np.ones((2, 6, 1), bool), np.full((2, 6, 1), "1"), np.ones((2, 6, 1), complex),
                               "torch-bool", [[[True]] * 6], [[["1"]] * 6], np.array([[["1"]] * 6], dtype=object)])
def test_the_model_refuses_what_a_data_file_is_refused_for(study, x):
    """Booleans, text and complex numbers were converted (complex: imaginary part dropped) and predicted."""
    import torch

    x = torch.ones(2, 6, 1, dtype=torch.bool) if isinstance(x, str) else x
    with pytest.raises(DataError, match=r"input must be real numbers \[N, T, F\] or \[T, F\], got dtype"):
        api.load_best_model(study).predict(x)


def test_masked_entries_and_pandas_missing_values_are_missing_as_nan_is(study):
    """A masked array's mask was dropped (the data beneath it, here 1e3, was predicted on); pandas'
    NA in a list or an object column was refused as not a number; a pandas frame made torch warn of
    a non-writable array; a reversed view was refused."""
    import warnings

    import pandas as pd

    model = api.load_best_model(study)
    x = np.random.default_rng(3).normal(size=(3, 6, 1))
    gaps = x.copy()
    gaps[0, :2] = np.nan
    expected = model.predict_proba(gaps)
    masked = np.ma.masked_array(x.copy(), mask=np.isnan(gaps))
    masked.data[0, :2] = 1e3
    np.testing.assert_allclose(model.predict_proba(masked), expected, rtol=1e-6)
    assert not np.allclose(model.predict_proba(masked.data), expected, rtol=1e-3)  # the data beneath counts otherwise
    frame = pd.DataFrame(gaps[0]).astype("Float64")
    assert frame.isna().sum().sum() == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(model.predict_proba(frame), expected[0], rtol=1e-6)
        np.testing.assert_allclose(model.predict_proba(pd.DataFrame(x[1])), expected[1], rtol=1e-6)
    for missing in (None, pd.NA):
        listed = [[[missing if np.isnan(v) else float(v)] for v in row[:, 0]] for row in gaps]
        np.testing.assert_allclose(model.predict_proba(listed), expected, rtol=1e-6)
    objects = pd.DataFrame(gaps[0], dtype=object)
    objects.iloc[:2, 0] = pd.NA
    np.testing.assert_allclose(model.predict_proba(objects), expected[0], rtol=1e-6)
    np.testing.assert_allclose(model.predict_proba(x[::-1]), model.predict_proba(x.copy()[::-1].copy()), rtol=1e-6)
    np.testing.assert_allclose(model.predict_proba(x[:, ::-1])[0], model.predict_proba(x[0, ::-1].copy()), rtol=1e-6)
    with pytest.raises(DataError, match=r"^series 0 \(and 2 more\) has no observed values \(all NaN\)$"):
        model.predict(np.ma.masked_array(x, mask=np.ones_like(x, bool)))


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_calling_the_model_refuses_what_predict_refuses(study, dtype):
    """model(x) returned logits for booleans, and for complex numbers with their imaginary part dropped."""
    with pytest.raises(DataError, match=rf"input must be real numbers \[N, T, F\] or \[T, F\], got dtype {dtype}"):
        api.load_best_model(study)(torch.ones(2, 6, 1, dtype=dtype))


def test_predict_file_names_an_argument_of_the_wrong_kind(study):
    with pytest.raises(TypeError, match=r"^model: expected a CycleModel \(load_best_model's\), got str$"):
        predict_file(study, study.parent / "test.csv", model="x")
    with pytest.raises(TypeError, match=r"^path: expected a file path, got NoneType$"):
        predict_file(study, None)


def test_an_npz_whose_x_is_a_single_number_is_one_line(study, tmp_path, capsys):
    np.savez(tmp_path / "one.npz", X=np.float32(1))
    assert main(["predict", str(study), str(tmp_path / "one.npz")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'one.npz'}: X must be 3-D [N, T, F], got shape []"


@pytest.mark.parametrize("name", ["p.npz", "p.parquet", "p.json"])
def test_an_output_named_as_another_format_is_refused_and_dash_is_stdout(study, tmp_path, capsys, name):
    """CSV text was written under any name (`-o p.parquet`), and `-o -` made a file named '-'."""
    test = str(study.parent / "test.csv")
    assert main(["predict", str(study), test, "-o", str(tmp_path / name)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: -o {tmp_path / name}: predictions are written as CSV; name a "
                                               ".csv file (or - for stdout)")
    assert list(tmp_path.iterdir()) == []
    run = subprocess.run([sys.executable, "-m", "cycle_optuna.cli", "predict", str(study), test, "-o", "-"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.startswith("series,id,predicted"), run.stdout[:80] + run.stderr
    assert list(tmp_path.iterdir()) == []
    assert main(["predict", str(study), test, "-o", str(tmp_path / "preds.v2")]) == 0  # a dot in a name is no format
    assert (tmp_path / "preds.v2").read_text().startswith("series,id,predicted")


def test_cli_writes_one_row_per_series(study, tmp_path, capsys):
    out = tmp_path / "sub" / "p.csv"
    assert main(["predict", str(study), str(study.parent / "test.csv"), "-o", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 20 and list(rows[0]) == ["series", "id", "predicted", "label", "p_a", "p_b"]
    assert rows[3]["id"] == "s3" and rows[3]["label"] == "b" and rows[3]["predicted"] in ("a", "b")
    said = capsys.readouterr().out
    assert "20 series of" in said and "accuracy" in said and str(out) in said
    # without -o: the CSV on stdout, the summary on stderr
    assert main(["predict", str(study), str(study.parent / "test.csv")]) == 0
    std = capsys.readouterr()
    assert std.out.startswith("series,id,predicted,label,p_a,p_b\n") and "20 series of" in std.err



def test_an_npz_y_against_named_classes_is_said_to_be_read_as_indices(study, tmp_path, capsys):
    x = np.array([[float(r.split(",")[2])] for r in _rows(20, 1)]).reshape(20, 6, 1)
    np.savez(tmp_path / "new.npz", X=x, y=np.arange(20) % 2)
    assert main(["predict", str(study), str(tmp_path / "new.npz")]) == 0
    assert "its y read as class indices: 0 = 'a', 1 = 'b'" in " ".join(capsys.readouterr().err.split())


def test_output_to_dev_stdout_keeps_the_summary_out_of_the_csv(study):
    """`-o /dev/stdout | ...`: the data stream is CSV only; the summary goes to stderr."""
    run = subprocess.run([sys.executable, "-m", "cycle_optuna.cli", "predict", str(study),
                          str(study.parent / "test.csv"), "-o", "/dev/stdout"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=study.parent)
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(io.StringIO(run.stdout)))
    assert len(rows) == 20 and all(r["predicted"] in ("a", "b") for r in rows)
    assert "series of" not in run.stdout and "20 series of" in run.stderr

@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("c.csv", "sample,label,f0\ns0,zebra,1\ns1,a,2\n", "class(es) zebra not in the training file's classes"),
        ("l.csv", "sample,f0\n" + "".join(f"s0,{t}\n" for t in range(9)), "series of up to 9 steps, the study's model "
                                                                             "reads at most 6"),
        ("f.csv", "sample,f0,f1\ns0,1,2\n", "feature column(s) 'f1' not in the study's training file, which has f0"),
        ("g.csv", "sample,g0\ns0,1\n", "missing feature column(s) 'f0': the study was trained on f0"),
        ("m.csv", "id,f0\ns0,1\n", "missing sample_column column 'sample'"),
        ("w.csv", "t0,t1,t2\n1,2,3\n", "new data needs the study's columns: each series' id in a column named "
                                       "'sample', a row per time step ([data] layout = \"long\")"),
        ("gone.csv", None, "data file not found"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(study, tmp_path, capsys, name, text, needle):
    data = tmp_path / name
    if text is not None:
        data.write_text(text)
    out = tmp_path / "p.csv"
    assert main(["predict", str(study), str(data), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and str(data) in err and "\n" not in err
    assert not out.exists()
    with pytest.raises(DataError):
        predict_file(study, data)


def test_an_output_that_is_a_directory_is_refused_before_anything_is_read(study, tmp_path, capsys):
    assert main(["predict", str(study), str(tmp_path / "never-read.csv"), "-o", str(tmp_path)]) == 2
    assert "is a directory, not a file" in capsys.readouterr().err


@pytest.mark.parametrize(("output", "what"), [("test.csv", "the data file to predict on"),
                                              ("tiny.toml", "the study file"), ("tiny.db", "the study's database"),
                                              ("train.csv", "data.source")])
def test_an_output_that_is_a_file_the_command_reads_is_refused_and_left_alone(study, capsys, output, what):
    target = study.parent / output
    before = target.read_bytes()
    assert main(["predict", str(study), str(study.parent / "test.csv"), "-o", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and what in err and str(target) in err and "\n" not in err
    assert target.read_bytes() == before


@pytest.mark.parametrize("which", ["model", "wal"])
def test_an_output_over_a_saved_model_or_the_database_log_is_refused_and_left_alone(study, capsys, which):
    """predict -o over the best model's file wrote a csv there: the model could not be loaded again."""
    from cycle_optuna import config

    if which == "model":
        target = next(config.resolve_artifact_dir(config.load(study)).iterdir())
    else:
        target = study.parent / "tiny.db-wal"
        if not target.exists():  # as a running worker's SQLite keeps it (one that exists holds commits: keep it)
            target.write_bytes(b"")
    before = target.read_bytes()
    for argv in (["predict", str(study), str(study.parent / "test.csv"), "-o", str(target)],
                 ["export", str(study), "--csv", str(target)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and str(target) in err and "\n" not in err
        assert ("artifact folder" if which == "model" else "a file of the study's database") in err
        assert target.read_bytes() == before


def test_an_output_named_as_a_database_side_file_not_there_yet_is_refused(study, capsys):
    """SQLite deletes a -wal/-journal file it finds when the database closes: an output written
    there was reported and then gone."""
    for end in ("-wal", "-shm", "-journal"):
        target = study.parent / f"tiny.db{end}"
        if target.exists():  # an open connection's (WAL mode): deleting it would lose commits; -journal never is
            continue
        for argv in (["predict", str(study), str(study.parent / "test.csv"), "-o", str(target)],
                     ["export", str(study), "--csv", str(target)]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert "that is a file of the study's database" in err and "\n" not in err
            assert not target.exists()


def test_an_output_that_is_a_pipe_or_a_link_is_written_through_not_replaced(study, tmp_path, capsys):
    import os
    import stat

    fifo = tmp_path / "pipe.csv"  # like -o /dev/stdout: renaming a file over it would replace the device
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert main(["predict", str(study), str(study.parent / "test.csv"), "-o", str(fifo)]) == 0
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert os.read(reader, 1 << 16).decode().startswith("series,id,predicted,label,p_a,p_b\n")
    finally:
        os.close(reader)
    link = tmp_path / "latest.csv"
    link.symlink_to("run1.csv")
    assert main(["predict", str(study), str(study.parent / "test.csv"), "-o", str(link)]) == 0
    assert link.is_symlink() and (tmp_path / "run1.csv").read_text().startswith("series,")


def test_best_and_the_report_show_a_class_the_model_misses_behind_a_high_accuracy(tmp_path, capsys):
    """18 test series of class a, 2 of class b that look like a: 90% accuracy, but class b is never
    found. The balanced accuracy (mean recall per class) and the lowest recall say so."""
    import json

    (tmp_path / "train.csv").write_text("\n".join(["sample,label,f0", *_rows(40, 0)]) + "\n")
    rows = [f"s{i},{'b' if i < 2 else 'a'},{-1 + 0.01 * t:.4f}" for i in range(20) for t in range(6)]
    (tmp_path / "test.csv").write_text("\n".join(["sample,label,f0", *rows]) + "\n")
    path = write_study(tmp_path, n_trials=1, epochs=3)
    path.write_text(drop_synthetic_keys(path.read_text()).replace(
        "[data]\n", '[data]\nsource = "train.csv"\ntest_source = "test.csv"\n'))
    api.run_study(path)
    score = api.held_out_score(path)
    assert predict_file(path, tmp_path / "test.csv").proba.argmax(axis=1).tolist() == [0] * 20  # all "a"
    assert score.accuracy == pytest.approx(0.9) and score.class_recall == {"a": (1.0, 18), "b": (0.0, 2)}
    assert score.balanced_accuracy == pytest.approx(0.5) and score.lowest_recall == ("b", 0.0, 2)
    assert main(["best", str(path), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["test_balanced_accuracy"] == pytest.approx(0.5)
    assert rec["test_class_recall"] == {"a": {"recall": 1.0, "n": 18}, "b": {"recall": 0.0, "n": 2}}
    assert main(["best", str(path)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "test balanced accuracy (held out) │ 50.00%" in text
    assert "lowest class recall (held out) │ 0.00% of 2 'b'" in text
    assert main(["report", str(path), "-o", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "- **Held-out balanced accuracy:** 50.00% (the mean of the classes' recalls; lowest: 0.00% of the 2 series of class 'b')" in report


def test_a_balanced_test_split_gets_its_lowest_class_recall_but_no_second_accuracy(study, tmp_path, capsys):
    """10 series of each class: balanced accuracy is accuracy, so only the lowest recall is added."""
    assert main(["best", str(study)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "lowest class recall (held out)" in text and "balanced accuracy" not in text
    assert main(["report", str(study), "-o", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "- **Lowest class recall (held out):** " in report and "balanced accuracy" not in report


def test_new_data_whose_label_column_is_left_empty_is_unlabelled(study, tmp_path):
    """A copy of the training file's layout with the labels cleared was refused ("line 2: empty
    label"), although new data's labels are optional; a half-filled column still is."""
    rows = _rows(20, 1)
    blank = tmp_path / "blank.csv"
    blank.write_text("\n".join(["sample,label,f0", *(",".join([r.split(",")[0], "", r.split(",")[2]]) for r in rows)]) + "\n")
    pred = predict_file(study, blank)
    assert pred.labels is None and pred.accuracy is None
    np.testing.assert_allclose(pred.proba, predict_file(study, study.parent / "test.csv").proba, rtol=1e-5)
    half = tmp_path / "half.csv"
    half.write_text("\n".join(["sample,label,f0", *rows[:6], *(",".join([r.split(",")[0], "", r.split(",")[2]])
                                                              for r in rows[6:])]) + "\n")
    with pytest.raises(DataError, match=r"half\.csv: line 8: empty label, where other series have theirs"):
        predict_file(study, half)
