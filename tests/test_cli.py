"""The command line on studies/quick.toml: runs, grows the same study, and refuses bad input cleanly."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import optuna
import pytest

from cycle_optuna import cli
from workers_helpers import drop_synthetic_keys, worker_env, write_study


def run_cli(*argv: str) -> int:
    return cli.main(list(argv))


def study_of(path, name="quick"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path.parent / (name + '.db')}")


def test_run_twice_grows_the_same_study_with_nothing_lost(quick_study, capsys):
    assert run_cli("run", str(quick_study), "--n-trials", "2") == 0
    first = [(t.number, t.params, t.value, t.state) for t in study_of(quick_study).trials]
    assert len(first) == 2
    out = capsys.readouterr().out
    assert "cycles of quick" in out
    assert "validation split holds" not in out  # 72 validation series: no small-split note
    assert run_cli("run", str(quick_study)) == 0  # the file's n_trials = 3
    trials = study_of(quick_study).trials
    assert len(trials) == 3
    assert [(t.number, t.params, t.value, t.state) for t in trials[:2]] == first
    assert study_of(quick_study).user_attrs["cycle_optuna_config"]["study"]["name"] == "quick"
    capsys.readouterr()
    assert run_cli("run", str(quick_study)) == 0  # at its total: nothing runs, and it says how to grow
    assert len(study_of(quick_study).trials) == 3
    assert "already holds 3 of 3 trials" in capsys.readouterr().out


def test_run_closes_with_the_best_cycle_and_a_reference_that_still_beats_it(quick_study, capsys):
    """Under the cycle table: the best cycle, whether a reference baseline still scores higher on
    validation (a tuned model below 1-NN is not done), and the command that gives the rest."""
    from cycle_optuna import api, config

    assert run_cli("run", str(quick_study), "--n-trials", "2") == 0
    study = study_of(quick_study)
    best = min((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"best: cycle {best.number + 1}, val loss {best.value:.4f}, "
                           f"accuracy {best.user_attrs['val_accuracy']:.2%}")
    assert line.endswith(f"'cycle-optuna best {quick_study}' gives its held-out test accuracy and the model")
    above = [b for b in api.baselines(study).values() if b["val_accuracy"] > best.user_attrs["val_accuracy"]]
    assert ("a reference baseline scores higher on validation" in line) == bool(above)
    # a stronger reference on record: named, with its score
    refs = dict(study.user_attrs[api.BASELINES_ATTR])
    refs["1nn"] = {**refs["1nn"], "val_accuracy": 1.0}
    study.set_user_attr(api.BASELINES_ATTR, refs)
    line = cli._best_line(study, config.load(quick_study))
    assert f"a reference baseline scores higher on validation ({refs['1nn']['label']}: 100.00%)" in line


def test_best_prints_table_and_json(quick_study, capsys):
    assert run_cli("run", str(quick_study), "--n-trials", "1") == 0
    capsys.readouterr()
    assert run_cli("best", str(quick_study), "--json") == 0
    best = json.loads(capsys.readouterr().out)
    assert best["number"] == 0
    assert set(best["params"]) == {"lr", "n_layers", "hidden_dim", "n_heads", "batch_size", "dropout", "patch_len",
                                   "conv_stem", "pos_encoding"}
    trial = study_of(quick_study).trials[0]
    assert best["duration_s"] == trial.duration.total_seconds() and best["duration"] == str(trial.duration)
    assert best["class_weights"] == "none"
    assert run_cli("best", str(quick_study)) == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "class-balanced" not in out
    # durations and the drop as people read them, not 0:00:03.141593 or 77.04839
    assert re.search(r"│ duration +│ +\d+\.\d s │", out), out
    assert re.search(r"│ train_seconds +│ +\d+\.\d s │", out), out
    assert re.search(r"│ improvement_pct +│ +-?\d+\.\d% │", out), out


def test_best_says_when_the_val_loss_is_class_balanced(quick_study, capsys):
    """Under class_weights = "balanced" the objective is the class-balanced validation loss, while the
    test loss beside it is the plain mean: the row says which."""
    quick_study.write_text(quick_study.read_text().replace("[train]\n", "[train]\nclass_weights = \"balanced\"\n", 1))
    assert run_cli("run", str(quick_study), "--n-trials", "1") == 0
    capsys.readouterr()
    assert run_cli("best", str(quick_study), "--json") == 0
    assert json.loads(capsys.readouterr().out)["class_weights"] == "balanced"
    assert run_cli("best", str(quick_study)) == 0
    assert re.search(r"│ val loss, class-balanced +│ +\d\.\d{4} │", capsys.readouterr().out)
    assert run_cli("report", str(quick_study), "-o", str(quick_study.parent / "r")) == 0
    assert "best validation loss (class-balanced" in (quick_study.parent / "r" / "report.md").read_text()


@pytest.mark.parametrize("seconds, text", [(0.04, "0.0 s"), (9.95, "9.9 s"), (59.94, "59.9 s"), (59.97, "1 min 00 s"), (60, "1 min 00 s"),
                                           (252.4, "4 min 12 s"), (3599.6, "1 h 00 min"), (7500, "2 h 05 min")])
def test_durations_read_as_seconds_minutes_or_hours(seconds, text):
    from cycle_optuna.durations import seconds_text

    assert seconds_text(seconds) == text


def test_bad_study_file_exits_2_with_one_line_and_writes_nothing(quick_study, capsys):
    quick_study.write_text(quick_study.read_text().replace("epochs = 5", "epoch = 5"))
    assert run_cli("run", str(quick_study)) == 2
    err = capsys.readouterr().err.strip()
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in err
    assert len(err.splitlines()) == 1
    assert not (quick_study.parent / "quick.db").exists()


def test_a_value_with_line_breaks_or_terminal_escapes_is_named_on_one_line(quick_study, capsys):
    text = quick_study.read_text().replace("[train]\n", '[train]\noptimizer = "x\\ny\\u001b[2J"\n', 1)
    quick_study.write_text(text)
    assert run_cli("run", str(quick_study)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "\x1b" not in err
    assert "train.optimizer" in err and "x\\ny\\x1b[2J" in err
    assert not (quick_study.parent / "quick.db").exists()


def test_a_value_is_printed_as_written_not_as_an_emoji(quick_study, capsys):
    quick_study.write_text(quick_study.read_text().replace('name = "quick"', 'name = "run:100:"', 1))
    assert run_cli("run", str(quick_study)) == 2
    assert "got 'run:100:'" in capsys.readouterr().err  # rich would print 'run💯'


@pytest.mark.parametrize("name, value", [
    ("CYCLE_OPTUNA_HEARTBEAT_SECONDS", "abc"), ("CYCLE_OPTUNA_HEARTBEAT_SECONDS", "0"),
    ("CYCLE_OPTUNA_GRACE_SECONDS", "1.5"), ("CYCLE_OPTUNA_THREADS", "-1"),
    # too large: the heartbeat thread died of an overflow, torch of a thread count it cannot unpack
    ("CYCLE_OPTUNA_HEARTBEAT_SECONDS", "9" * 23), ("CYCLE_OPTUNA_THREADS", "9" * 23),
    ("CYCLE_OPTUNA_THREADS", str((__import__("os").cpu_count() or 1) + 1)),
    ("CYCLE_OPTUNA_PG_TIMEOUT_SECONDS", "2"),  # below a keepalive probe a second
    ("CYCLE_OPTUNA_ARTIFACT_DIR", " "),  # made a folder named " "
])
def test_a_bad_environment_variable_is_one_line_and_nothing_runs(quick_study, capsys, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert run_cli("run", str(quick_study)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"${name}: {value!r}" in err
    assert not (quick_study.parent / "quick.db").exists()


def test_bad_storage_url_exits_2_and_masks_the_password(quick_study, capsys):
    url = "postgresql+psycopg://alice:s3cret@127.0.0.1:1/none"
    assert run_cli("run", str(quick_study), "--storage", url) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err
    assert "alice:***@127.0.0.1:1" in err
    assert run_cli("run", str(quick_study), "--storage", "notaurl") == 2
    assert "bad storage URL" in capsys.readouterr().err


def test_best_on_a_study_that_does_not_exist_exits_2(quick_study, capsys):
    assert run_cli("best", str(quick_study)) == 2
    assert "quick" in capsys.readouterr().err


def test_unexpected_error_exits_1_without_traceback_unless_debug(quick_study, capsys, monkeypatch):
    from cycle_optuna import worker

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(worker, "run_worker", boom)
    assert run_cli("run", str(quick_study)) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: kaboom" in err and "Traceback" not in err
    with pytest.raises(RuntimeError):
        run_cli("--debug", "run", str(quick_study))


@pytest.mark.parametrize("command", ["run", "worker", "status", "best", "report", "dashboard"])
def test_every_command_has_help_with_examples(command):
    proc = subprocess.run([sys.executable, "-m", "cycle_optuna.cli", command, "--help"],
                          capture_output=True, text=True, check=True)
    assert "examples:" in proc.stdout
    assert f"cycle-optuna {command} studies/" in proc.stdout


def test_console_script_runs_the_quick_study(quick_study):
    env = {**os.environ, "CYCLE_OPTUNA_STORAGE": ""}
    script = os.path.join(os.path.dirname(sys.executable), "cycle-optuna")
    proc = subprocess.run([script, "run", str(quick_study), "--n-trials", "1"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cycles of quick" in proc.stdout
    assert len(study_of(quick_study).trials) == 1


@pytest.mark.parametrize("argv", [["--help"], ["status", "{study}"], ["best", "{study}", "--json", "--no-test"]])
def test_everyday_commands_do_not_import_torch(quick_study, argv):
    """`--help`, `status` and `best --json` stay fast: they never import torch or alembic (Optuna's
    schema migrations, which a read-only command skips), nor, for --help, Optuna."""
    assert cli.main(["run", str(quick_study), "--n-trials", "1"]) == 0 if argv != ["--help"] else True
    code = ("import sys\nfrom cycle_optuna.cli import main\n"
            "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
            "print('imported:', 'torch' in sys.modules or 'alembic' in sys.modules, 'optuna' in sys.modules, 'code:', code)\n")
    args = [a.format(study=quick_study) for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "CYCLE_OPTUNA_STORAGE"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("imported: False") and last.endswith("code: 0"), proc.stdout + proc.stderr
    if argv == ["--help"]:
        assert last == "imported: False False code: 0"


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file, key or value, exit 2, printed before anything, nothing written.
# ---------------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

QUICK = (Path(__file__).resolve().parents[1] / "studies" / "quick.toml").read_text()


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _bad_input(tmp_path: Path, capsys, *argv: str) -> str:
    """Run the CLI in tmp_path; check the bad-input contract; the error line."""
    before = _tree(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = run_cli(*argv)
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == ""  # no banner, no progress bar
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert _tree(tmp_path) == before  # nothing created
    return lines[0]


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe\x00\x81garbage", "s.toml: not a UTF-8 text file (byte 0xff at offset 0)"),
    (QUICK.replace('name = "quick"', 'name = "quick"  # caf\xe9').encode("latin-1"), "s.toml: not a UTF-8 text file"),
    (b"", "s.toml: the study file is empty"),
    (b"# only a comment\n\n", "s.toml: the study file is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not a UTF-8 text file"),
])
def test_unreadable_or_empty_study_files(tmp_path: Path, capsys, content: bytes, words: str):
    (tmp_path / "s.toml").write_bytes(content)
    assert words in _bad_input(tmp_path, capsys, "run", "s.toml")


def _study(tmp_path: Path, text: str = QUICK) -> str:
    (tmp_path / "s.toml").write_text(text)
    return "s.toml"


def test_run_to_a_sqlite_file_in_a_missing_directory_says_so(tmp_path: Path, capsys):
    line = _bad_input(tmp_path, capsys, "run", _study(tmp_path), "--storage", "sqlite:///missing/dir/x.db")
    assert "directory missing/dir does not exist" in line
    line = _bad_input(tmp_path, capsys, "run", "s.toml", "--storage", "sqlite:///s.toml/x.db")
    assert "s.toml is a file, not a directory" in line


def test_an_empty_study_path_is_named(tmp_path: Path, capsys):
    for command in ("run", "status", "best", "refit", "dashboard"):
        with pytest.raises(SystemExit) as e:
            run_cli(command, "")
        assert e.value.code == 2 and "argument STUDY.toml: must be a path, got ''" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["status", "best", "report", "dashboard"])
def test_read_only_commands_create_nothing(tmp_path: Path, capsys, command: str):
    study = _study(tmp_path)
    assert "no study database at quick.db" in _bad_input(tmp_path, capsys, command, study)
    assert "no study database at missing/x.db" in _bad_input(
        tmp_path, capsys, command, study, "--storage", "sqlite:///missing/x.db")
    assert "no study database" in _bad_input(tmp_path, capsys, command, study, "--storage", "journal:///missing/x.log")
    assert "no study database at y.db" in _bad_input(tmp_path, capsys, command, study, "--storage", "sqlite+pysqlite:///y.db")


def test_a_missing_database_driver_names_what_to_install(tmp_path: Path, capsys):
    line = _bad_input(tmp_path, capsys, "run", _study(tmp_path), "--storage", "postgresql+psycopg2://u:s3cret@h/x")
    assert "database driver 'psycopg2' is not installed (pip install psycopg2-binary" in line
    assert "s3cret" not in line


@pytest.mark.parametrize("artifact_dir", ['"s.toml"', '"s.toml/models"'])
def test_an_artifact_dir_that_names_a_file_is_refused_before_the_study_is_created(tmp_path: Path, capsys, artifact_dir):
    study = _study(tmp_path, QUICK.replace("[study]\n", f"[study]\nartifact_dir = {artifact_dir}\n"))
    assert "study.artifact_dir" in _bad_input(tmp_path, capsys, "run", study)


def test_report_onto_an_existing_file_is_refused_before_anything_is_written(quick_study, capsys):
    assert run_cli("run", str(quick_study), "--n-trials", "1") == 0
    (quick_study.parent / "report.md").write_text("mine")
    capsys.readouterr()
    line = _bad_input(quick_study.parent, capsys, "report", "quick.toml", "-o", "report.md", "--no-test")
    assert "report.md is a file, not a directory" in line
    assert (quick_study.parent / "report.md").read_text() == "mine"


@pytest.mark.parametrize("target", ["quick-artifacts", "quick-artifacts/report"])
def test_report_into_the_artifact_folder_is_refused(quick_study, capsys, target):
    """The artifact folder holds the study's models and checkpoints (the dashboard serves it): the
    report's files do not go among them."""
    assert run_cli("run", str(quick_study), "--n-trials", "1") == 0
    artifacts = quick_study.parent / "quick-artifacts"
    before = sorted(p.name for p in artifacts.iterdir())
    capsys.readouterr()
    line = _bad_input(quick_study.parent, capsys, "report", "quick.toml", "-o", target, "--no-test")
    assert f"-o {target}: that is the study's artifact folder" in line
    assert sorted(p.name for p in artifacts.iterdir()) == before


@pytest.mark.parametrize("space, key", [
    ("dropout = { low = 0.0, high = 1.5 }", "space.dropout.high: dropout must be in [0, 1), got 1.5"),
    ("batch_size = { choices = [-8, 32] }", "space.batch_size.choices: batch_size must be in [1, 1048576], got -8"),
    ("lr = { low = -0.01, high = 0.01 }", "space.lr.low: lr must be in (0, 10], got -0.01"),
])
def test_search_bounds_outside_a_parameters_domain(tmp_path: Path, capsys, space: str, key: str):
    name = space.split()[0]
    lines = [line for line in QUICK.splitlines() if not line.startswith(f"{name} = {{")]
    study = _study(tmp_path, "\n".join(lines).replace("[space]", f"[space]\n{space}") + "\n")
    assert key in _bad_input(tmp_path, capsys, "worker", study)


def _read_only_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write: a read-only tmpfs as root, else a chmod."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "s.toml").write_text(QUICK)
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return ro
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(ro)], capture_output=True).returncode == 0
    if not ok:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    (ro / "s.toml").write_text(QUICK)
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    return ro


def test_run_in_a_read_only_directory_says_so(tmp_path: Path, capsys):
    ro = _read_only_dir(tmp_path)
    try:
        line = _bad_input(ro, capsys, "run", "s.toml")
        assert "cannot write" in line and "read-only" in line
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)
        else:
            ro.chmod(0o755)


def test_run_with_workers_checks_the_folder_of_their_logs_first(tmp_path: Path, capsys, monkeypatch):
    """The workers' logs go beside the study file: a folder that takes no files is one line before
    the banner, and the database named elsewhere is not created."""
    ro = _read_only_dir(tmp_path)
    monkeypatch.setenv("CYCLE_OPTUNA_ARTIFACT_DIR", str(tmp_path / "arts"))
    try:
        line = _bad_input(ro, capsys, "run", "s.toml", "--workers", "2", "--storage", f"sqlite:///{tmp_path / 'w.db'}")
        assert "the workers' log folder" in line or ("cannot write" in line and "read-only" in line), line
        assert not (tmp_path / "w.db").exists() and not (tmp_path / "arts").exists()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)
        else:
            ro.chmod(0o755)


def test_ctrl_c_during_report_leaves_no_truncated_file(quick_study, capsys, monkeypatch):
    from matplotlib.figure import Figure

    assert run_cli("run", str(quick_study), "--n-trials", "1") == 0
    real = Figure.savefig
    calls = []

    def interrupted(self, fname, *args, **kwargs):
        calls.append(fname)
        if len(calls) == 2:  # the second plot: half written, then Ctrl-C
            Path(fname).write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", interrupted)
    out = quick_study.parent / "rep"
    assert run_cli("report", str(quick_study), "-o", str(out), "--no-test") == 130
    assert not out.exists()  # plots are staged and moved in at the end: no partial file, no temporary one


def test_a_small_validation_split_is_named_before_the_cycles(quick_study, capsys):
    text = quick_study.read_text().replace("n_samples = 480", "n_samples = 120\nfolds = 1")
    assert "n_samples = 120" in text
    quick_study.write_text(text)
    assert run_cli("run", str(quick_study), "--n-trials", "1") == 0
    out = capsys.readouterr().out
    note = next(line for line in out.splitlines() if "validation split holds" in line)
    assert note.startswith("note: the validation split holds 18 series (val_fraction=0.15): one series is 6 points")
    assert "[data] folds = 5 cross-validates instead" in note  # names what would steady it
    assert out.index(note) < out.index("cycles of quick")  # said before the cycles, not after


def test_auto_folds_cross_validate_a_small_split_and_say_so(quick_study, capsys):
    text = quick_study.read_text().replace("n_samples = 480", "n_samples = 120")
    quick_study.write_text(text)
    assert run_cli("run", str(quick_study), "--n-trials", "1") == 0
    out = capsys.readouterr().out
    note = next(line for line in out.splitlines() if "cross-validation" in line)
    # 120 series: 18 validation and 84 training; the test split (18) stays out of the folds
    assert note.startswith('note: cycles are scored by 5-fold cross-validation over the 102 training and validation '
                           'series ([data] folds = "auto": the validation split alone would hold 18)')
    assert "validation split holds" not in out
    assert out.index(note) < out.index("cycles of quick")
    assert run_cli("best", str(quick_study), "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["test_accuracy"] is not None and record["folds"] == 5
    assert run_cli("best", str(quick_study)) == 0
    assert "val accuracy (5-fold cross-validation)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["run", "{study}", "--n-trials", "x"],
     "error: cycle-optuna run: argument --n-trials: must be a whole number of trials from 1 to 1000000, got 'x'"),
    # a typo, not a plan: it ran trial after trial
    (["run", "{study}", "--n-trials", "9" * 20], "error: cycle-optuna run: argument --n-trials: must be a whole number "
                                                 "of trials from 1 to 1000000, got 99999999999999999999"),
    (["run", "{study}", "--bogus"], "error: cycle-optuna: unrecognized arguments: --bogus"),
    (["worker", "{study}", "--wait-for-storage", "9" * 23],
     "error: cycle-optuna worker: argument --wait-for-storage: must be a whole number of seconds from 0 to 604800"),
    (["run", "{study}", "--timeout", "0"], "error: cycle-optuna run: argument --timeout: must be a duration such as 90, "
                                           "90s, 45m or 2h, more than 0 and at most 365 days, got '0'"),
    # int() and float() read other scripts' digits; a flag takes the ones a shell user types
    (["worker", "{study}", "--n-trials", "\uff15"], "error: cycle-optuna worker: argument --n-trials: must be a whole "
                                                   "number of trials from 1 to 1000000, got '\uff15'"),
    (["frob"], "error: cycle-optuna: argument COMMAND: invalid choice: 'frob'"),
    (["run", "{study}", "postgresql://u:hunter2@db/x"], "error: cycle-optuna: unrecognized arguments: postgresql://u:***@db/x"),
    # an unset shell variable: not silently the default SQLite file
    (["run", "{study}", "--storage", ""], "error: cycle-optuna run: argument --storage: must be a storage URL, got '' "
                                          "(leave --storage out for the default)"),
])
def test_a_bad_flag_is_one_line_and_exit_2_with_nothing_written(quick_study, argv, says):
    before = sorted(p.name for p in quick_study.parent.iterdir())
    proc = subprocess.run([sys.executable, "-m", "cycle_optuna.cli", *[a.format(study=quick_study) for a in argv]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and proc.stderr.startswith(says)
    assert "usage:" not in proc.stderr and "hunter2" not in proc.stderr
    assert sorted(p.name for p in quick_study.parent.iterdir()) == before


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("45m", 2700), ("2h", 7200), ("1.5h", 5400),
                                           (" 2H ", 7200), (".5m", 30), ("1d", 86_400), ("0.001", 0.001),
                                           ("1h30m", 5400), ("1h 30m 10s", 5410)])
def test_a_timeout_reads_as_people_write_durations(text, seconds):
    assert cli._duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["0", "0s", "-5", "1y", "inf", "nan", "", "1e3", "1h30", "h", "\uff19\uff10", "366d"])
def test_a_timeout_that_is_no_duration_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be a duration such as 90, 90s, 45m or 2h"):
        cli._duration(text)


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["run", "run-workers"])
def test_run_out_of_time_says_so_exits_0_and_the_same_command_goes_on(tmp_path: Path, capsys, workers):
    """A time limit that is up before the first trial (1 ms: reading the file takes longer): no
    trial starts, the study and its retries stay as they were, and the next run goes on."""
    study = write_study(tmp_path, n_trials=2, epochs=1)
    assert run_cli("run", str(study), *workers, "--timeout", "0.001") == 0
    out = capsys.readouterr().out
    # the random sampler's study holds its baseline, enqueued at creation, waiting
    assert "time limit reached (--timeout 0.001 s): the study holds 1 of 2 trials; the same command goes on" in out
    held = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}")
    assert [t.state.name for t in held.trials] == ["WAITING"]
    assert run_cli("run", str(study), *workers) == 0
    assert [t.state.name for t in held.trials] == ["COMPLETE", "COMPLETE"]
    assert "time limit" not in capsys.readouterr().out


def _csv_study(quick_study: Path, counts: dict[str, int], extra: str = "") -> Path:
    """quick.toml on a .csv file of `counts` series per class (12 steps, one feature, class-dependent)."""
    rows = ["sample,label,f0"]
    for c, (name, n) in enumerate(counts.items()):
        rows += [f"{name}{i},{name},{np.sin((c + 1) * t / 3) + 0.1 * i}" for i in range(n) for t in range(12)]
    (quick_study.parent / "d.csv").write_text("\n".join(rows))
    text = drop_synthetic_keys(quick_study.read_text()).replace('source = "synthetic"', f'source = "d.csv"{extra}')
    quick_study.write_text(text)
    return quick_study


def test_classes_without_a_validation_series_are_named(quick_study, capsys):
    study = _csv_study(quick_study, {"walk": 40, "run": 40, "rare": 1}, "\nfolds = 1")
    assert run_cli("run", str(study), "--n-trials", "1") == 0
    out = capsys.readouterr().out
    note = next(line for line in out.splitlines() if "validation split (all of them train)" in line)
    assert note.startswith("note: class(es) rare have too few series")
    assert out.index(note) < out.index("cycles of quick")


def test_a_class_name_cannot_write_escape_sequences_to_the_terminal(quick_study, capsys):
    study = _csv_study(quick_study, {"walk": 40, "run": 40, "r\x1b[2Jare": 1}, "\nfolds = 1")
    assert run_cli("run", str(study), "--n-trials", "1") == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "note: class(es) r\\x1b[2Jare have too few series" in out


def test_an_empty_validation_split_is_bad_input_and_writes_nothing(quick_study, capsys):
    study = _csv_study(quick_study, {"a": 1, "b": 1, "c": 1, "d": 1}, '\nfolds = 1\ntest_source = "t.csv"')
    (study.parent / "t.csv").write_text((study.parent / "d.csv").read_text() + "\n")  # not a copy: that is refused first
    assert "d.csv: the validation split is empty" in _bad_input(study.parent, capsys, "run", str(study))
    # without a test file its test split is empty too: named first, since cross-validation would not cure it
    study.write_text(study.read_text().replace('test_source = "t.csv"', ""))
    assert "d.csv: the test split is empty" in _bad_input(study.parent, capsys, "run", str(study))


def test_a_model_too_large_for_the_machine_is_bad_input_and_writes_nothing(quick_study, capsys):
    """Allowed values (hidden_dim up to 16384, n_layers up to 128) whose model cannot fit: the kernel
    killed the worker for memory minutes later, with the study database left behind."""
    quick_study.write_text(quick_study.read_text().replace("n_layers = { low = 1, high = 2 }", "n_layers = { low = 1, high = 128 }")
                           .replace("hidden_dim = { choices = [16, 32] }", "hidden_dim = { choices = [32, 16384] }"))
    line = _bad_input(quick_study.parent, capsys, "run", str(quick_study))
    assert re.fullmatch(rf"error: {re.escape(str(quick_study))}: space\.hidden_dim: a model of hidden_dim 16384 with 128 "
                        r"layer\(s\) has about 4\.2e\+11 parameters; its weights and gradients alone take [\d,]+ GiB, and "
                        r"(this machine|the GPU) has [\d,]+ GiB", line), line


def test_a_synthetic_task_too_large_to_make_here_is_bad_input_and_writes_nothing(quick_study, capsys):
    """2^30 values is allowed by the study file; made in memory they take ~32 GiB."""
    from cycle_optuna.preflight import _memory

    if _memory() >= 32 * 2**30:
        pytest.skip(f"this machine has {_memory() / 2**30:.0f} GiB: it can make the task")
    quick_study.write_text(quick_study.read_text().replace("n_samples = 480", "n_samples = 4194304")
                           .replace("seq_len = 16", "seq_len = 64"))
    line = _bad_input(quick_study.parent, capsys, "run", str(quick_study))
    assert re.fullmatch(rf"error: {re.escape(str(quick_study))}: data: a synthetic task of 4194304 x 64 x 4 values takes "
                        r"about 32 GiB to make, and this machine has [\d,]+ GiB", line), line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_device_is_bad_input_and_writes_nothing(quick_study, capsys):
    quick_study.write_text(quick_study.read_text().replace("[train]", '[train]\ndevice = "cuda"'))
    line = _bad_input(quick_study.parent, capsys, "run", str(quick_study))
    assert line == f"error: {quick_study}: train.device: 'cuda' was requested but torch sees no CUDA device"


def test_an_empty_test_split_is_bad_input_and_writes_nothing(quick_study, capsys):
    study = _csv_study(quick_study, {"a": 2, "b": 2}, "\nfolds = 1")  # one series each for train and validation
    assert "d.csv: the test split is empty" in _bad_input(study.parent, capsys, "run", str(study))


def test_a_class_of_one_series_under_cross_validation_is_named(quick_study, capsys):
    study = _csv_study(quick_study, {"walk": 12, "run": 12, "rare": 1})  # folds "auto": a small split
    assert run_cli("run", str(study), "--n-trials", "1") == 0
    note = next(line for line in capsys.readouterr().out.splitlines() if "cross-validation" in line)
    # it is scored, by the one fold model that never saw its class: not left out, as an earlier note said
    assert note.endswith("class(es) rare have a single series, validated by the one fold model that never saw the "
                         "class: it counts as a likely miss in every cycle's score alike")


# ---------------------------------------------------------------------------------------------
# Bad storages and output paths: one line, exit 2, and the files left exactly as they were.
# ---------------------------------------------------------------------------------------------

TINY_STUDY = """[study]
name = "t"
n_trials = 1
[data]
source = "synthetic"
n_samples = 60
[train]
epochs = 1
device = "cpu"
threads = 1
[sampler]
type = "random"
[pruner]
type = "none"
"""
READERS = ["status", "best", "report", "export"]


def _same_bytes(tmp_path: Path, capsys, path: Path, *argv: str) -> str:
    """_bad_input, and `path` (a storage file) left byte for byte as it was."""
    before = path.read_bytes()
    line = _bad_input(tmp_path, capsys, *argv)
    assert path.read_bytes() == before
    return line


@pytest.mark.parametrize("command", ["run", *READERS])
@pytest.mark.parametrize("content, why", [
    (b"\x00garbage\n" * 10, "its last line is not an Optuna journal record"),
    (b'{"op_code": 99, "worker_id": "x"}\nnot json\n', "its last line is not an Optuna journal record"),
    (b'{"op_code": 99, "worker_id": "x"}\n', "a line is not an Optuna journal operation"),
    (b'{"op_code": 0, "worker_id": "x", "study_name": "a", "directions": [1]}\n{not json}\n',
     "its last line is not an Optuna journal record"),
    (b"not json\n" + b'{"op_code": 99, "worker_id": "x"}\n', "a line is not JSON"),  # Optuna's reader names it
    # one bad line: Optuna's reader forgives it as a torn last write, so `run` used to append to it and break the file
    (b"not json\n", "its last line is not an Optuna journal record"),
    (b"xx", "its last line is not an Optuna journal record"),
    (b'{"a": 1}\n' * 150_000 + b"not json\n", "its last line is not an Optuna journal record"),  # past the tail read
], ids=["binary", "not-json", "unknown-operation", "json-shaped", "bad-first-line", "one-bad-line", "no-newline",
        "long"])
def test_a_journal_storage_that_is_not_a_journal_is_named(tmp_path: Path, capsys, command, content, why):
    log = tmp_path / "x.log"
    log.write_bytes(content)
    line = _same_bytes(tmp_path, capsys, log, command, _study(tmp_path, TINY_STUDY), "--storage", f"journal://{log}")
    assert line == f"error: {log}: not a journal file ({why})"


@pytest.mark.parametrize("command", ["run", *READERS])
def test_a_sqlite_storage_that_is_not_a_database_is_named(tmp_path: Path, capsys, command):
    (tmp_path / "t.db").write_bytes(b"junk" * 50)
    line = _same_bytes(tmp_path, capsys, tmp_path / "t.db", command, _study(tmp_path, TINY_STUDY))
    assert line == "error: cannot open storage sqlite:///t.db: file is not a database"


@pytest.mark.parametrize("command", [*READERS, "dashboard"])
@pytest.mark.parametrize("tables", [False, True], ids=["empty-file", "other-tables"])
def test_read_only_commands_on_a_sqlite_file_without_optunas_tables_write_nothing(tmp_path: Path, capsys, command,
                                                                                   tables):
    import sqlite3

    db = tmp_path / "t.db"
    db.touch()  # an empty file is an empty SQLite database
    if tables:
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE mine (x)")
        sqlite3.connect(db).close()
    line = _same_bytes(tmp_path, capsys, db, command, _study(tmp_path, TINY_STUDY))
    assert line == ("error: storage sqlite:///t.db holds no studies "
                    "(no Optuna tables in it: nothing has run on it yet)")


@pytest.mark.parametrize("command", READERS)
def test_read_only_commands_on_an_empty_postgresql_database_create_no_tables(tmp_path: Path, capsys, pg_url, command):
    import psycopg
    from sqlalchemy.engine import make_url

    url = pg_url.replace("postgres@", "postgres:s3cret@")  # trust auth ignores the password; it must not show
    line = _bad_input(tmp_path, capsys, command, _study(tmp_path, TINY_STUDY), "--storage", url)
    assert line == (f"error: storage {pg_url.replace('postgres@', 'postgres:***@')} holds no studies "
                    "(no Optuna tables in it: nothing has run on it yet)")
    u = make_url(pg_url)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database) as conn:
        assert conn.execute("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)


@pytest.fixture
def tiny_run(tmp_path: Path, capsys) -> str:
    """TINY_STUDY run once in tmp_path (its t.db holds one trial); the study file's name."""
    study = _study(tmp_path, TINY_STUDY)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert run_cli("run", study) == 0
    finally:
        os.chdir(cwd)
    capsys.readouterr()
    return study


@pytest.mark.parametrize("argv, says", [
    (["export", "{study}", "--csv", "out"],
     "error: out is a directory, not a file (name the file to write, e.g. out/cycles.csv)"),
    (["export", "{study}", "--parquet", "out"], "error: out is a directory, not a file"),
    (["export", "{study}", "--csv", "s.toml/x.csv"],
     "error: export output directory s.toml: s.toml is a file, not a directory"),
    (["report", "{study}", "-o", "s.toml/rep", "--no-test"],
     "error: report output directory s.toml/rep: s.toml is a file, not a directory"),
])
def test_an_output_path_that_cannot_be_written_is_refused_first(tmp_path: Path, capsys, tiny_run, argv, says):
    (tmp_path / "out").mkdir()
    line = _bad_input(tmp_path, capsys, *[a.format(study=tiny_run) for a in argv])
    assert line.startswith(says)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("argv", [
    ["export", "{study}", "--csv", "/proc/x.csv"],
    ["export", "{study}", "--csv", "/proc/new/x.csv"],
    ["report", "{study}", "-o", "/proc/rep", "--no-test"],
])
def test_an_output_path_where_no_file_can_be_made_is_refused_first(tmp_path: Path, capsys, tiny_run, argv):
    # root's permissions allow /proc; only a real try shows that it takes no new files
    line = _bad_input(tmp_path, capsys, *[a.format(study=tiny_run) for a in argv])
    assert line.startswith("error: cannot write /proc")


def test_a_dashboard_that_cannot_listen_creates_nothing(tmp_path: Path, capsys):
    import socket

    study = _study(tmp_path, TINY_STUDY)
    optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path / 't.db'}")  # a database to serve
    line = _bad_input(tmp_path, capsys, "dashboard", study, "--host", "no.such.host.invalid")
    assert line.startswith("error: cannot listen on no.such.host.invalid:8080: ")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _bad_input(tmp_path, capsys, "dashboard", study, "--port", str(port)).startswith(
            f"error: cannot listen on 127.0.0.1:{port}: ")



# ---------------------------------------------------------------------------------------------
# Settings that would never take effect: one line naming the key, exit 2, nothing written.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("old, new, says", [
    ("epochs = 1\n", "epochs = 1\nwarmup_epochs = 2.0\n",
     "train.warmup_epochs: 2 is longer than the training (train.epochs = 1): the learning rate would never reach lr; "
     "at most 1"),
    ('type = "none"', 'type = "median"\nreduction_factor = 3',
     "pruner.reduction_factor: not used by type = 'median' (which reads n_startup_trials, n_warmup_steps); it is a "
     "setting of type successive_halving, hyperband"),
    ('epochs = 1\n', 'epochs = 3\n', None),  # placeholder replaced below: median n_warmup_steps past the last epoch
    ('source = "synthetic"\nn_samples = 60', 'source = "d.npz"\nlabel_column = "y"',
     "data.label_column: only a .csv data file has columns to name, and data.source 'd.npz' is a .npz file"),
    ('device = "cpu"', 'device = "cpu"\ncompile = "cudagraphs"',
     "train.compile: 'cudagraphs' needs a CUDA device, and this run is on the CPU (train.device = 'cpu'); use compile "
     "= true or false"),
    ('name = "t"', 'name = "t"\nstorage = ""',
     "study.storage: is empty; leave the key out for the default (beside the study file)"),
    ('threads = 1\n', 'threads = 100000\n',
     f"train.threads: 100000 is more than this machine's {os.cpu_count()} cores; at most that, or 0 = cores / workers"),
], ids=["warmup-longer-than-run", "pruner-key-unused", "pruner-warmup-past-the-last-epoch", "npz-label-column",
        "cudagraphs-on-cpu", "empty-storage", "threads-beyond-the-cores"])
def test_a_setting_that_never_takes_effect_is_bad_input(tmp_path: Path, capsys, old, new, says):
    np.savez(tmp_path / "d.npz", X=np.random.default_rng(0).normal(size=(60, 6, 2)), y=np.arange(60) % 3)
    text = TINY_STUDY.replace(old, new)
    if says is None:
        text = text.replace('type = "none"', 'type = "median"\nn_warmup_steps = 2')
        says = ("pruner.n_warmup_steps: 2 leaves no epoch to prune: the median pruner would first stop a trial at "
                "epoch 3, and with train.epochs = 3 the last epoch a trial can be stopped at is 2 (never its last)")
    assert text != TINY_STUDY
    assert _bad_input(tmp_path, capsys, "run", _study(tmp_path, text)) == f"error: s.toml: {says}"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cudagraphs_with_device_auto_on_a_machine_without_cuda_is_bad_input(tmp_path: Path, capsys):
    text = TINY_STUDY.replace('device = "cpu"', 'compile = "cudagraphs"')
    assert _bad_input(tmp_path, capsys, "worker", _study(tmp_path, text)) == (
        "error: s.toml: train.compile: 'cudagraphs' needs a CUDA device, and this run is on the CPU (torch sees no "
        "CUDA device); use compile = true or false")


def test_a_study_name_too_long_for_a_file_name_is_bad_input(tmp_path: Path, capsys):
    text = TINY_STUDY.replace('name = "t"', f'name = "{"n" * 240}"')  # <name>-artifacts would pass 255 bytes
    assert _bad_input(tmp_path, capsys, "run", _study(tmp_path, text)).startswith(
        "error: s.toml: study.name: at most 200 characters")


@pytest.mark.parametrize("command", ["run", "worker"])
def test_a_study_of_the_same_name_made_by_other_code_is_not_joined_nor_touched(tmp_path: Path, capsys, command):
    db = tmp_path / "t.db"
    other = optuna.create_study(study_name="t", storage=f"sqlite:///{db}")
    other.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    text = TINY_STUDY.replace("n_trials = 1", "n_trials = 20")  # room to join: only the origin refuses it
    line = _same_bytes(tmp_path, capsys, db, command, _study(tmp_path, text))
    assert line == f"error: study 't' in sqlite:///{db.name} holds 2 trial(s) that cycle-optuna did not make " \
                   "(no study config stored on it); give [study] name another name"


def test_reading_a_study_does_not_need_its_data_file_where_the_study_file_says(tmp_path: Path, capsys):
    """The definition is stored on the study: status, best, report and export read it; only
    commands that train need the data file."""
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    np.savez(tmp_path / "d.npz", X=(rng.normal(size=(40, 8, 2)) + y[:, None, None]).astype(np.float32), y=y)
    text = TINY_STUDY.replace('source = "synthetic"\nn_samples = 60', 'source = "d.npz"')
    study = _study(tmp_path, text)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert run_cli("run", study) == 0
        (tmp_path / "d.npz").rename(tmp_path / "elsewhere.npz")
        capsys.readouterr()
        for command in READERS:
            assert run_cli(command, study) == 0, capsys.readouterr().err
        assert "unavailable" in capsys.readouterr().out  # best: no test split without the data
        assert run_cli("run", study, "--n-trials", "2") == 2
        assert "data.source: file not found" in capsys.readouterr().err
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("url, made", [("sqlite:///here.db", "here.db"), ("journal://here.log", "here.log"),
                                       ("sqlite+pysqlite:///here.db?timeout=20", "here.db")])
def test_a_relative_storage_path_in_the_study_file_is_beside_the_study_file(tmp_path: Path, monkeypatch, capsys,
                                                                            url: str, made: str):
    """A worker started from another directory finds the study's database instead of starting
    the study over in a new one; a --storage flag's relative path stays the shell's."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.toml").write_text(TINY_STUDY.replace("n_trials = 1", f'n_trials = 1\nstorage = "{url}"'))
    monkeypatch.chdir(tmp_path)
    assert run_cli("worker", "sub/s.toml") == 0
    assert (tmp_path / "sub" / made).is_file() and not (tmp_path / made).exists()
    capsys.readouterr()
    assert run_cli("status", "sub/s.toml") == 0  # the same database, read from elsewhere
    assert "study t: 1 of 1 trials finished" in capsys.readouterr().out
    assert run_cli("worker", "sub/s.toml", "--storage", "sqlite:///flag.db") == 0
    assert (tmp_path / "flag.db").is_file()


def test_parameters_the_model_cannot_be_built_from_fail_their_trial_in_one_line(tmp_path: Path, monkeypatch, capsys,
                                                                                 caplog):
    """n_heads 3 with hidden_dim 16 from an int range: that trial fails with its reason, no traceback."""
    text = TINY_STUDY.replace(
        '[sampler]', '[baseline]\nhidden_dim = 16\nn_heads = 2\n[space]\nn_heads = { low = 2, high = 3 }\n[sampler]')
    (tmp_path / "s.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert run_cli("worker", "s.toml") == 0  # the baseline
    optuna.load_study(study_name="t", storage="sqlite:///t.db").enqueue_trial({"n_heads": 3})
    optuna.load_study(study_name="t", storage="sqlite:///t.db").enqueue_trial({"n_heads": -1})  # outside the space
    capsys.readouterr()
    caplog.clear()
    assert run_cli("worker", "s.toml", "--n-trials", "3") == 0
    first, second = [r for r in caplog.records if "failed with parameters" in r.getMessage()]
    assert "n_heads=3 does not divide hidden_dim=16" in first.getMessage()
    assert "n_heads: " in second.getMessage() and "a value enqueued for this trial outside the space?" in second.getMessage()
    assert not first.exc_info and not second.exc_info  # no traceback: the reason is the whole story
    # the cycles table, report and export show what the failed trials were to run, not the baseline
    from cycle_optuna import api

    assert [c.params["n_heads"] for c in api.cycles("s.toml")] == [2, 3, -1]
    # a trial that failed at its first suggestion holds no parameter: its enqueued value is shown
    optuna.load_study(study_name="t", storage="sqlite:///t.db").enqueue_trial({"n_heads": "four"})
    assert run_cli("worker", "s.toml", "--n-trials", "4") == 0
    assert api.cycles("s.toml")[3].params["n_heads"] == "four" and api.cycles("s.toml")[3].state == "FAIL"


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite+pysqlite://",
                                 "sqlite:///file:m?mode=memory&cache=shared&uri=true",
                                 "sqlite:///file::memory:?cache=shared&uri=true"])
@pytest.mark.parametrize("command", ["run", "worker"])
def test_an_in_memory_storage_is_bad_input(tmp_path: Path, capsys, command: str, url: str):
    line = _bad_input(tmp_path, capsys, command, _study(tmp_path, TINY_STUDY), "--storage", url)
    assert line.startswith(f"error: storage {url} is an in-memory database")


@pytest.mark.parametrize("made", ["foreign", "maximise", "two objectives"])
def test_read_commands_refuse_a_study_they_would_misread(tmp_path: Path, capsys, made: str):
    """A study of the file's name made by plain Optuna: best picked the wrong trial and report wrote
    its notes into it; a multi-objective one crashed every read command."""
    import optuna

    study = _study(tmp_path, TINY_STUDY)
    directions = {"foreign": ["minimize"], "maximise": ["maximize"], "two objectives": ["minimize", "minimize"]}[made]
    db = optuna.create_study(study_name="t", storage=f"sqlite:///{tmp_path / 't.db'}", directions=directions)
    db.optimize(lambda t: (t.suggest_float("x", 0, 1),) * len(directions), n_trials=2)
    for command in (["best"], ["best", "--json"], ["report", "-o", "rep"], ["export"], ["status"]):
        if command == ["status"] and made == "foreign":  # states and workers of any study, but not the file's total
            assert cli.main(["status", str(tmp_path / study)]) == 0
            shown = " ".join(capsys.readouterr().out.split())  # the title may wrap
            assert "study t: 2 trials finished (no total: a study other code made)" in shown, shown
            continue
        line = _bad_input(tmp_path, capsys, *command[:1], study, *command[1:])
        want = {"foreign": "holds 2 trial(s) that cycle-optuna did not make", "maximise": "maximises its value",
                "two objectives": "has 2 objectives"}[made]
        assert line.startswith("error: study 't' in ") and want in line, line


def test_more_local_workers_than_the_machine_can_hold_is_bad_input(tmp_path: Path, capsys):
    from cycle_optuna import cli, worker

    k = cli.WORKERS_PER_CORE * worker.available_cores() + 1
    line = _bad_input(tmp_path, capsys, "run", _study(tmp_path, TINY_STUDY), "--workers", str(k))
    assert line.startswith(f"error: --workers {k}: more than {cli.WORKERS_PER_CORE} per core")


@pytest.mark.parametrize("command", ["worker", "status"])
def test_a_database_left_in_the_current_directory_by_the_old_rule_is_named(tmp_path: Path, capsys, command: str):
    """Before, a relative [study] storage path was taken from the current directory: a study kept
    there is not started over beside the study file, nor reported missing, without a word."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.toml").write_text(TINY_STUDY.replace("n_trials = 1", 'n_trials = 1\nstorage = "sqlite:///here.db"'))
    (tmp_path / "here.db").write_bytes(b"")
    line = _bad_input(tmp_path, capsys, command, "sub/s.toml")
    assert line.startswith("error: [study] storage sqlite:///here.db: a relative path is taken from the study file's folder")
    assert "sub/here.db does not exist; here.db in the current directory does" in line


def test_a_storage_flag_leaves_the_study_files_url_unread(tmp_path: Path, monkeypatch):
    """The old-place check is the study file's URL's: --storage overrides that URL, untouched."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.toml").write_text(TINY_STUDY.replace("n_trials = 1", 'n_trials = 1\nstorage = "sqlite:///here.db"'))
    (tmp_path / "here.db").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert run_cli("worker", "sub/s.toml", "--storage", "sqlite:///other.db") == 0
    assert (tmp_path / "other.db").is_file() and not (tmp_path / "sub" / "here.db").exists()


def test_the_run_banner_counts_one_trial_as_one(tmp_path: Path, capsys):
    study = write_study(tmp_path, n_trials=1, epochs=1)
    assert run_cli("run", str(study)) == 0
    assert "1 trial, sampler random, pruner none" in capsys.readouterr().out  # was "1 trials"
    assert run_cli("run", str(study), "--n-trials", "2") == 0
    assert "2 trials, sampler random" in capsys.readouterr().out


def test_run_on_a_terminal_says_the_time_left_after_each_cycle_but_the_last(tmp_path: Path, monkeypatch):
    import io

    screen = io.StringIO()
    monkeypatch.setattr(cli, "out", cli._Console(emoji=False, force_terminal=True, file=screen, width=200))
    assert run_cli("run", str(write_study(tmp_path, n_trials=3, epochs=1))) == 0
    lines = set(re.findall(r"last: cycle \d \w+ [\d.]+(?:; about [\d.]+ (?:s|min [\d]+ s|h [\d]+ min) left)?",
                           screen.getvalue()))
    assert any(re.fullmatch(r"last: cycle 1 \w+ [\d.]+; about .+ left", line) for line in lines), lines
    assert any(re.fullmatch(r"last: cycle 3 \w+ [\d.]+", line) for line in lines), lines  # nothing left: no estimate


@pytest.mark.parametrize("command", ["status", "export"])
def test_output_to_a_full_disk_is_one_line_without_the_training_hint(tmp_path: Path, command: str):
    study = write_study(tmp_path, n_trials=1, epochs=1)
    assert run_cli("run", str(study)) == 0
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "cycle_optuna.cli", command, str(study)], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120, env=worker_env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: writing the output: No space left on device; free space and run again"


def test_sigterm_is_exit_143_for_every_command_ctrl_c_130(tmp_path: Path):
    """SIGTERM at a moment no command installs a handler of its own (the study file being read):
    it was the process's default death (-15) or "interrupted" with 130."""
    study = _study(tmp_path, TINY_STUDY)
    hold = (
        "import sys, time\n"
        "import cycle_optuna.config as c\n"
        "load = c.load\n"
        "def slow(*a, **k):\n"
        "    print('reading', flush=True)\n"
        "    time.sleep(60)\n"
        "    return load(*a, **k)\n"
        "c.load = slow\n"
        "from cycle_optuna.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-c", hold, "status", study], cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout.readline().strip() == "reading"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 128 + sig and "interrupted" in out, (proc.returncode, out)


def test_run_with_workers_on_a_study_that_holds_all_its_trials_starts_none(tmp_path: Path, capsys):
    study = _study(tmp_path, TINY_STUDY.replace("n_trials = 1", "n_trials = 2"))
    assert run_cli("run", str(tmp_path / study)) == 0
    capsys.readouterr()
    assert run_cli("run", str(tmp_path / study), "--workers", "2") == 0
    out = capsys.readouterr().out
    assert "the study already holds all its 2 trials" in out and "cycles of t" in out
    assert not list(tmp_path.glob("t-worker-*.log"))  # no worker was started


def test_a_sampler_or_pruner_changed_between_runs_is_noted_and_reported(tmp_path: Path, capsys, caplog):
    study = _study(tmp_path, TINY_STUDY)
    assert run_cli("run", str(tmp_path / study)) == 0
    path = tmp_path / study
    path.write_text(path.read_text().replace('type = "random"', 'type = "tpe"').replace('type = "none"', 'type = "median"'))
    capsys.readouterr()
    assert run_cli("run", str(path), "--n-trials", "2") == 0
    assert ("note: sampler tpe and pruner median from cycle 2 on (the study ran sampler random and pruner none "
            "before)") in caplog.text
    assert run_cli("report", str(path), "-o", str(tmp_path / "rep"), "--no-test") == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "with sampler `random` and pruner `none`, then sampler `tpe` and pruner `median` from cycle 2" in text
    caplog.clear()
    assert run_cli("run", str(path), "--n-trials", "2") == 0  # unchanged since: nothing more to note
    assert "note: sampler" not in caplog.text


def test_optunas_sql_fallback_warning_is_left_to_debug(tmp_path: Path, caplog):
    """When a query fails (mostly: the database went away), Optuna logs "Caught an error from
    sqlalchemy" with the SQL and its parameters; the worker's own line says what happened."""
    import logging

    study = write_study(tmp_path, n_trials=1, epochs=1)
    assert run_cli("status", str(study)) in (0, 2)  # any command sets the logging up
    rdb = logging.getLogger("optuna.storages._rdb.storage")
    with caplog.at_level(logging.WARNING, logger="optuna"):
        rdb.warning("Caught an error from sqlalchemy: (psycopg.errors.AdminShutdown) terminating connection. "
                    "Falling back to a slower alternative.")
        rdb.warning("another warning of Optuna's")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("optuna")] == ["another warning of Optuna's"]


def test_version_names_this_package_and_what_it_runs_on(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"cycle-optuna {metadata.version('cycle-optuna')} (optuna {optuna.__version__}, torch ")
    assert f"python {sys.version.split()[0]})" in line and "\n" not in line
    import cycle_optuna

    assert cycle_optuna.__version__ == metadata.version("cycle-optuna")
