"""The command line on studies/quick.toml: runs, grows the same study, and refuses bad input cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest

from cycle_optuna import cli


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
    assert run_cli("run", str(quick_study)) == 0  # the file's n_trials = 3
    trials = study_of(quick_study).trials
    assert len(trials) == 3
    assert [(t.number, t.params, t.value, t.state) for t in trials[:2]] == first
    assert study_of(quick_study).user_attrs["cycle_optuna_config"]["study"]["name"] == "quick"
    capsys.readouterr()
    assert run_cli("run", str(quick_study)) == 0  # at its total: nothing runs, and it says how to grow
    assert len(study_of(quick_study).trials) == 3
    assert "already holds 3 of 3 trials" in capsys.readouterr().out


def test_best_prints_table_and_json(quick_study, capsys):
    assert run_cli("run", str(quick_study), "--n-trials", "1") == 0
    capsys.readouterr()
    assert run_cli("best", str(quick_study), "--json") == 0
    best = json.loads(capsys.readouterr().out)
    assert best["number"] == 0
    assert set(best["params"]) == {"lr", "n_layers", "hidden_dim", "n_heads", "batch_size", "dropout"}
    assert run_cli("best", str(quick_study)) == 0
    assert "val loss" in capsys.readouterr().out


def test_bad_study_file_exits_2_with_one_line_and_writes_nothing(quick_study, capsys):
    quick_study.write_text(quick_study.read_text().replace("epochs = 5", "epoch = 5"))
    assert run_cli("run", str(quick_study)) == 2
    err = capsys.readouterr().err.strip()
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in err
    assert len(err.splitlines()) == 1
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
