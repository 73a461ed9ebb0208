"""Export: one row per cycle to CSV/Parquet, read back equal to the study's trials; trials_dataframe works."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from cycle_optuna import api, cli, export
from cycle_optuna.errors import ConfigError
from conftest_report import make_study


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("export"), "cycle", with_model=False)


def _cell(v):
    """A CSV cell as Python: empty -> None (pandas reads NaN); ints in a column with gaps come back as floats."""
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def _equal(cell, v) -> bool:
    cell = _cell(cell)
    if v is None or cell is None:
        return cell is None and (v is None or (isinstance(v, float) and math.isnan(v)))
    if isinstance(v, (list, dict)):
        return json.loads(cell) == v
    if isinstance(v, bool):
        return str(cell) == str(v)
    if isinstance(v, (int, float)):
        return cell == pytest.approx(v)
    return str(cell) == v


def test_csv_round_trip_equals_the_trials(study_file, tmp_path, capsys):
    out = tmp_path / "cycles.csv"
    assert cli.main(["export", str(study_file), "--csv", str(out)]) == 0
    df = pd.read_csv(out)
    study = api.load_study(study_file)
    trials = study.get_trials()
    assert list(df["cycle"]) == [t.number + 1 for t in trials]
    assert list(df["state"]) == [t.state.name for t in trials]
    for (_, row), t in zip(df.iterrows(), trials):
        assert _equal(row["value"], t.value)
        for k, v in t.params.items():
            assert _equal(row[f"params_{k}"], v), k
        for k, v in t.user_attrs.items():
            assert _equal(row[f"user_attrs_{k}"], v), k
        assert not [c for c in df.columns if c.startswith("user_attrs_") and c[11:] not in t.user_attrs
                    and _cell(row[c]) is not None]  # no attr invented
    # the reason column: the prune reason, the failure cause, the sampler's reason
    assert df.loc[4, "reason"] == "val loss 0.9700 at epoch 2 fell behind other trials"
    assert df.loc[5, "reason"] == "CUDA out of memory"
    assert df.loc[0, "reason"] == "cycle 1: baseline configuration"
    assert df.loc[0, "params_batch_size"] == 32  # fixed parameters too: every hyperparameter of the cycle


def test_parquet_round_trip_keeps_types(study_file, tmp_path):
    path = export.write(study_file, tmp_path / "cycles.parquet")
    df = pd.read_parquet(path)
    expected = export.frame(study_file)
    pd.testing.assert_frame_equal(df, expected, check_dtype=False)
    assert df["value"].dtype.kind == "f" and df["params_n_layers"].dtype.kind == "i"


def test_csv_on_stdout_and_bad_suffix(study_file, tmp_path, capsys):
    assert cli.main(["export", str(study_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cycle,number,state,value,reason") and len(lines) == 7
    with pytest.raises(SystemExit) as e:  # argparse: one destination only
        cli.main(["export", str(study_file), "--csv", str(tmp_path / "x.csv"), "--parquet", "y"])
    assert e.value.code == 2 and not (tmp_path / "x.csv").exists()
    with pytest.raises(Exception, match=r"x\.txt: unknown export format '\.txt'"):
        export.write(study_file, tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()
    # fmt names the format, whatever the file is called: the error names fmt, not the suffix
    with pytest.raises(ConfigError, match=r"^fmt: unknown export format 'xlsx'"):
        export.write(study_file, tmp_path / "x.csv", fmt="xlsx")
    assert not (tmp_path / "x.csv").exists()
    assert pd.read_csv(export.write(study_file, tmp_path / "upper.out", fmt="CSV")).shape[0] == 6


def test_optunas_trials_dataframe_works(study_file):
    df = api.load_study(study_file).trials_dataframe()
    assert len(df) == 6 and "params_lr" in df.columns


@pytest.mark.parametrize("command", [["export"], ["best", "--no-test"], ["status"]])
def test_a_reader_that_stops_early_is_not_an_error(study_file, command):
    """`cycle-optuna export STUDY | head -1`: a closed pipe ends the command quietly (exit 141, as
    SIGPIPE), also where rich prints the output (it exited 1)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "cycle_optuna.cli", *command[:1], str(study_file), *command[1:]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "error" not in err.lower(), err


@pytest.mark.parametrize("flag", ["--csv", "--parquet"])
def test_export_never_overwrites_the_study_file_or_its_database(study_file, capsys, flag):
    db = next(study_file.parent.glob("*.db"))
    before = {p: p.read_bytes() for p in (study_file, db)}
    for target in before:
        assert cli.main(["export", str(study_file), flag, str(target)]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {target}: that is the study" in err and len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("given", ["file", "study"])
def test_write_from_python_never_overwrites_the_study_file_or_its_database(study_file, given):
    db = next(study_file.parent.glob("*.db"))
    before = {p: p.read_bytes() for p in (study_file, db)}
    study = study_file if given == "file" else api.load_study(study_file)
    targets = [db] if given == "study" else [study_file, db]  # a loaded study does not know its file
    for target in targets:
        with pytest.raises(ConfigError, match=rf"path {target}: that is the study"):
            export.write(study, target, fmt="csv")
    assert {p: p.read_bytes() for p in before} == before


def test_write_from_python_never_overwrites_a_journal_study(tmp_path):
    from cycle_optuna import cli as cli_mod
    from workers_helpers import write_study

    path = write_study(tmp_path, n_trials=1, epochs=1)
    journal = tmp_path / "q.log"
    path.write_text(path.read_text().replace("[study]\n", f'[study]\nstorage = "journal://{journal}"\n'))
    assert cli_mod.main(["worker", str(path)]) == 0
    before = journal.read_bytes()
    for given in (api.load_study(path), path):
        with pytest.raises(ConfigError, match="that is the study's database"):
            export.write(given, journal, fmt="csv")
    assert journal.read_bytes() == before


@pytest.mark.parametrize("argv", [["export", "{s}", "--csv", ""], ["export", "{s}", "--parquet", " "],
                                  ["report", "{s}", "-o", ""], ["predict", "{s}", ""]])
def test_an_empty_path_is_refused_not_read_as_no_flag(study_file, tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)  # an empty -o would have meant here
    with pytest.raises(SystemExit) as e:
        cli.main([a.format(s=study_file) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr()
    assert "must be a path" in err.err and len(err.err.splitlines()) == 1 and err.out == ""
    assert list(tmp_path.iterdir()) == []


def test_export_to_dash_is_stdout_and_a_folder_name_is_refused(study_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", str(study_file), "--csv", "-"]) == 0
    out = capsys.readouterr().out
    assert out == export.frame(str(study_file)).to_csv(index=False)  # the table itself, as with no flag
    for flag, target in (("--csv", "newdir/"), ("--parquet", "-")):
        assert cli.main(["export", str(study_file), flag, target]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} {target}: ") and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no file named "-" or "newdir"
