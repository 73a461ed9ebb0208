"""Python API: load_study, best_trial/best_params, cycles, load_best_model, best_record, the docs snippet."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from cycle_optuna import api, best_params, best_trial, cycles, load_best_model, load_study
from cycle_optuna.data import load_task
from cycle_optuna.errors import ConfigError, DataError, StorageError
from conftest_report import make_study

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("api")
    return {v: make_study(tmp / v, v) for v in ("cycle", "tpe")}


def test_load_study_from_file_and_by_name(studies, monkeypatch):
    path = studies["cycle"]
    study = load_study(path)
    assert study.study_name == "refcycles"
    url = f"sqlite:///{path.parent / 'refcycles.db'}"
    assert load_study("refcycles", storage=url).study_name == "refcycles"
    monkeypatch.setenv("CYCLE_OPTUNA_STORAGE", url)
    assert len(load_study("refcycles").trials) == 6
    assert load_study(study) is study


def test_load_study_errors_are_one_clear_line(studies, tmp_path):
    with pytest.raises(ConfigError, match="storage"):
        load_study("refcycles")
    url = f"sqlite:///{studies['cycle'].parent / 'refcycles.db'}"
    with pytest.raises(StorageError, match="no study named 'nope'.*refcycles"):
        load_study("nope", storage=url)
    missing = tmp_path / "missing.db"
    with pytest.raises(StorageError, match="no study database"):
        load_study("x", storage=f"sqlite:///{missing}")
    assert not missing.exists()  # a query must not create an empty database
    with pytest.raises(StorageError, match="no study database"):
        load_study("x", storage=f"sqlite+pysqlite:///{missing}")  # through any SQLite driver
    assert not missing.exists()


def test_best_trial_and_params(studies):
    assert best_trial(studies["cycle"]).number == 0
    assert best_trial(studies["tpe"]).number == 4
    params = best_params(studies["tpe"])
    # searched params of the best trial over the stored baseline: every hyperparameter is present
    assert params == {"lr": 3.9e-3, "batch_size": 32, "hidden_dim": 32, "n_layers": 3, "n_heads": 2,
                      "dropout": 0.0, "weight_decay": 0.01, "patch_len": 0, "conv_stem": 2,
                      "pos_encoding": "sinusoidal", "pooling": "max", "instance_norm": False,
                      "summary_features": False, "step_conv": False}


def test_no_completed_trials_is_a_clear_error(tmp_path):
    import optuna

    study = optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path / 'e.db'}")
    with pytest.raises(StorageError, match="no completed trials yet"):
        best_trial(study)
    for state in (optuna.trial.TrialState.PRUNED,) * 3 + (optuna.trial.TrialState.FAIL,):
        study.tell(study.ask(), state=state)
    # finished without a value: waiting would not help, so the message says what happened instead of "yet"
    with pytest.raises(StorageError, match=r"no completed trial: all 4 were stopped early or failed \(3 pruned and 1 failed\)"):
        best_trial(study)
    study.ask()  # one still running: it may yet complete
    with pytest.raises(StorageError, match="no completed trials yet"):
        load_best_model(study)


def test_cycles_records(studies):
    rec = cycles(studies["cycle"])
    assert [c.cycle for c in rec] == [1, 2, 3, 4, 5, 6]
    assert [c.state for c in rec] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "PRUNED", "FAIL"]
    assert rec[0].key_change == "baseline configuration"
    # the cycle sampler's move, then what changed against its parent (cycle 5's parent is cycle 1)
    assert rec[1].key_change == "lr x2: lr 0.0005 -> 0.001, n_layers 2 -> 3"
    assert rec[4].key_change.startswith("n_layers +1: lr 0.0005 -> 0.001, n_layers 2 -> 6")
    assert rec[3].diverged and "non-finite" in rec[3].reason
    assert rec[5].reason == "CUDA out of memory"
    assert rec[0].curve == pytest.approx([0.927, 0.921, 0.9192, 0.9195])
    assert rec[0].val_accuracy == pytest.approx(0.4709) and rec[0].epochs_run == 4
    assert rec[0].params["batch_size"] == 32 and "batch_size" not in rec[0].searched
    # without sampler attrs the key change is what differs from the previous cycle
    tpe = cycles(studies["tpe"])
    assert tpe[0].key_change == "baseline configuration"
    assert tpe[1].key_change == "lr 0.0005 -> 0.001, n_layers 1 -> 2"


def test_one_trials_key_change_reads_the_same_parent_as_the_cycle_table(studies):
    """cycle_parent is a cycle number (trial number + 1): the dashboard note's change (key_change,
    one trial at a time) names the same parent as the table's."""
    study = load_study(studies["cycle"])
    table = {c.number: c.key_change for c in cycles(study)}
    trials = study.get_trials()
    assert any(isinstance(p := t.user_attrs.get("cycle_parent"), int) and p != t.number for t in trials)  # a parent
    for t in trials:                                                     # other than the previous cycle
        assert api.key_change(study, t) == table[t.number], t.number


def test_load_best_model_predicts_on_raw_data(studies):
    model = load_best_model(studies["tpe"])
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.params["n_layers"] == 3 and model.trial_number == 4
    cfg = api.study_config(load_study(studies["tpe"]))
    data = load_task(cfg.data, cfg.study.seed)
    raw = data.x_test.numpy() * data.std + data.mean  # what a user has: unnormalised sequences
    with torch.inference_mode():
        expected = model.net(data.x_test).argmax(1).numpy()
    assert np.array_equal(model.predict(raw), expected)
    proba = model.predict_proba(raw)
    assert proba.shape == (len(raw), 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert model.predict(raw[0]).shape == ()  # one [T, F] sequence
    assert (model.seq_len, model.n_features) == (6, 3)
    assert model.predict(raw[:2, :4]).shape == (2,)  # shorter series are fine
    # input the model cannot read: one DataError naming what is wrong, not torch's error or silent NaN
    for bad, needle in [(np.zeros((2, 6, 4)), "F = 3 feature"), (np.zeros((2, 7, 3)), "input of 7 steps"),
                        (np.zeros((1, 2, 6, 3)), "input of shape [1, 2, 6, 3]"), (np.zeros((2, 0, 3)), "1 <= T"),
                        (np.full((2, 6, 3), np.inf), "inf values"), ([["a"]], "must be real numbers")]:
        for call in (model.predict, model.predict_proba):
            with pytest.raises(DataError, match=re.escape(needle)):
                call(bad)


def test_the_model_refuses_what_a_data_file_would_be_refused_for(studies):
    """predict/predict_proba/model(x) once gave a class for an all-NaN series and NaN logits for
    values beyond float32, where predict_file refused the same series."""
    model = load_best_model(studies["tpe"])
    ok = np.ones((3, 6, 3))
    all_nan, big = ok.copy(), ok.copy()
    all_nan[1:] = np.nan
    big[0, 2, 1] = 1e39
    for bad, needle in [(all_nan, "series 1 (and 1 more) has no observed values"), (big, "beyond 32-bit floats")]:
        for call in (model.predict, model.predict_proba, lambda x: model(torch.as_tensor(x))):
            with pytest.raises(DataError, match=re.escape(needle)):
                call(bad)
    with pytest.raises(DataError, match="the sequence has no observed values"):
        model.predict(all_nan[1])
    # model(x) is the tensor entry point: numpy and single sequences are said, not torch's AttributeError
    with pytest.raises(TypeError, match=r"model\(x\) takes a torch tensor"):
        model(ok)
    with pytest.raises(DataError, match=re.escape("takes a batch [N, T, F], got shape [6, 3]")):
        model(torch.as_tensor(ok[0]))
    with pytest.raises(DataError, match="F = 3 feature"):
        model(torch.zeros(2, 6, 4))
    partly = ok.copy()
    partly[0, :3] = np.nan  # some steps missing: read as in training
    with torch.inference_mode():
        assert torch.isfinite(model(torch.as_tensor(partly))).all()
    assert model.predict(partly).shape == (3,)


def test_wrong_argument_types_name_the_argument(studies, tmp_path):
    import optuna

    path = studies["tpe"]
    with pytest.raises(TypeError, match=r"storage: expected a URL string.*sqlite:///"):
        load_study("refcycles", storage=path.parent / "refcycles.db")
    with pytest.raises(TypeError, match="storage: expected a URL string, got int"):
        api.run_study(path, 123)
    with pytest.raises(TypeError, match="study: expected a study file path.*got int"):
        load_study(123)
    with pytest.raises(TypeError, match="model: expected a CycleModel"):
        api.held_out_score(path, model="x")
    with pytest.raises(TypeError, match="refit: expected None, True or False, got 'no'"):
        load_best_model(path, refit="no")
    with pytest.raises(TypeError, match="^with_test: expected True or False, got 'no'$"):
        api.best_record(path, with_test="no")
    with pytest.raises(TypeError, match=r"^data: expected the study's splits \(study_data's\), got int$"):
        api.held_out_score(path, data=1)
    with pytest.raises(TypeError, match="^artifact_dir: expected a folder path, got int$"):
        load_best_model(path, artifact_dir=123)
    # a study handed over as an object is checked as one loaded by name: the queries rank by lowest value
    maxi = optuna.create_study(direction="maximize")
    maxi.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    for query in (best_trial, best_params, api.best_record):
        with pytest.raises(StorageError, match="maximises its value"):
            query(maxi)
    two = optuna.create_study(directions=["minimize", "minimize"])
    with pytest.raises(StorageError, match="has 2 objectives"):
        best_params(two)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", 2_000_000])
def test_run_study_checks_n_trials_before_writing(tmp_path, bad):
    """It stored any n_trials on the study config, which every later read then refused."""
    from workers_helpers import write_study

    path = write_study(tmp_path, n_trials=1, epochs=1)
    with pytest.raises(ConfigError, match=re.escape(f"n_trials: must be a whole number of trials from 1 to 1000000, got {bad!r}")):
        api.run_study(path, n_trials=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "60"])
def test_run_study_checks_timeout_before_writing(tmp_path, bad):
    from workers_helpers import write_study

    path = write_study(tmp_path, n_trials=1, epochs=1)
    with pytest.raises(ValueError, match=re.escape(f"timeout: expected a number of seconds above 0, got {bad!r}")):
        api.run_study(path, timeout=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


def test_run_study_out_of_time_starts_nothing_and_a_later_call_goes_on(tmp_path):
    from workers_helpers import write_study

    path = write_study(tmp_path, n_trials=2, epochs=1)
    study = api.run_study(path, timeout=1e-6)  # up before the first trial: reading the file takes longer
    assert [t.state.name for t in study.trials] == ["WAITING"]  # the baseline, enqueued at creation
    assert [t.state.name for t in api.run_study(path, timeout=3600).trials] == ["COMPLETE", "COMPLETE"]


def test_load_best_model_without_artifact(tmp_path):
    path = make_study(tmp_path, "tpe", with_model=False)
    with pytest.raises(StorageError, match="no saved model"):
        load_best_model(path)


@pytest.mark.parametrize("damage", [lambda b: b[:3000], lambda b: b"garbage" * 100], ids=["truncated", "garbage"])
def test_a_corrupt_model_file_is_one_clear_error_and_best_still_answers(tmp_path, capsys, damage):
    from cycle_optuna import cli, config

    path = make_study(tmp_path, "tpe")
    artifacts = config.resolve_artifact_dir(config.load(path))
    for f in artifacts.iterdir():
        f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(StorageError, match=r"model artifact .* of cycle 5 in .* cannot be read \(corrupt or truncated"):
        load_best_model(path)
    assert cli.main(["best", str(path)]) == 0  # the table still prints; the test score is unavailable
    out = capsys.readouterr().out
    assert "unavailable: model artifact" in " ".join(out.split())


def _best_artifact(path):
    from cycle_optuna import config

    study = load_study(path)
    return config.resolve_artifact_dir(config.load(path)) / study.best_trial.user_attrs["model_artifact_id"]


def test_an_unreadable_model_file_is_one_clear_error_and_best_still_answers(tmp_path, capsys):
    """A worker running as another user, or a folder where the file was: OSError, not a crash."""
    from cycle_optuna import cli

    path = make_study(tmp_path, "tpe")
    f = _best_artifact(path)
    f.unlink()
    f.mkdir()  # read by root too, unlike a permission: the same OSError branch
    with pytest.raises(StorageError, match=r"model artifact .* of cycle 5 in .* cannot be read: "):
        load_best_model(path)
    assert cli.main(["best", str(path)]) == 0
    assert "unavailable: model artifact" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("edit", ["shape", "no kwargs"])
def test_a_model_file_of_another_shape_is_one_clear_error(tmp_path, capsys, edit):
    import torch

    from cycle_optuna import cli

    path = make_study(tmp_path, "tpe")
    f = _best_artifact(path)
    payload = torch.load(f, weights_only=True)
    if edit == "shape":
        payload["state_dict"][next(iter(payload["state_dict"]))] = torch.zeros(1)
    else:
        del payload["model_kwargs"]
    torch.save(payload, f)
    match = "does not fit the model it describes" if edit == "shape" else "is not a cycle-optuna model"
    with pytest.raises(StorageError, match=rf"model artifact .* of cycle 5 in .* {match}"):
        load_best_model(path)
    assert cli.main(["best", str(path)]) == 0
    assert "unavailable: model artifact" in " ".join(capsys.readouterr().out.split())


def test_held_out_score_uses_the_test_split(studies):
    score = api.held_out_score(studies["tpe"])
    cfg = api.study_config(load_study(studies["tpe"]))
    data = load_task(cfg.data, cfg.study.seed)
    model = load_best_model(studies["tpe"])
    pred = model.net(data.x_test).argmax(1)
    acc = float((pred == data.y_test).double().mean())
    assert score.n == len(data.y_test) and score.accuracy == pytest.approx(acc) and score.cycle == 5
    # the built-in task's classes have no names: their indices
    recall = {str(k): (float((pred[data.y_test == k] == k).double().mean()), int((data.y_test == k).sum()))
              for k in range(data.n_classes)}
    assert score.class_recall.keys() == recall.keys()
    assert all(score.class_recall[k] == pytest.approx(recall[k]) for k in recall)
    assert score.balanced_accuracy == pytest.approx(np.mean([r for r, _ in recall.values()]))


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_best_record_uses_optuna_cli_field_names(studies, monkeypatch, capsys):
    from optuna.cli import main as optuna_cli

    path = studies["cycle"]
    url = f"sqlite:///{path.parent / 'refcycles.db'}"
    monkeypatch.setattr(sys, "argv", ["optuna", "best-trial", "--study-name", "refcycles", "--storage", url, "-f", "json"])
    assert optuna_cli() == 0
    out = capsys.readouterr().out
    theirs = json.loads(out[out.index("{"):])
    ours = api.best_record(path)
    assert set(theirs) <= set(ours)
    for key in theirs:
        assert ours[key] == theirs[key], key
    assert ours["cycle"] == 1 and 0 <= ours["test_accuracy"] <= 1


def _snippet() -> str:
    """The python block of README.md's Python API section, else of docs/python-api.md."""
    for doc in (ROOT / "README.md", ROOT / "docs" / "python-api.md"):
        if doc.exists():
            text = doc.read_text()
            m = re.search(r"```python\n(.*?load_best_model.*?)```", text, re.S)
            if m:
                return m.group(1)
    pytest.fail("no python block using load_best_model in README.md or docs/python-api.md")


@pytest.mark.slow
def test_documented_snippet_runs(tmp_path, monkeypatch, capsys, one_thread):
    """From a fresh checkout's state: studies/quick.toml and no database; the snippet runs the study itself."""
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "quick.toml").write_text((ROOT / "studies" / "quick.toml").read_text())
    monkeypatch.chdir(tmp_path)  # the snippet names studies/quick.toml, as a user in the repository would
    exec(compile(_snippet(), "python-api snippet", "exec"), {"__name__": "__snippet__"})
    out = capsys.readouterr().out
    assert re.search(r"cycle \d: val loss \d\.\d{4}, val acc \d+\.\d{2}%", out), out
    assert "held-out test accuracy" in out
    assert len(load_study(tmp_path / "studies" / "quick.toml").trials) == 3


def test_best_and_report_read_this_machines_copy_of_the_data_and_artifacts(tmp_path, one_thread):
    """A study made in one folder, read from a copy of the project at another path (another machine's
    clone): the held-out test uses the copy's data and models, as long as the data is the same."""
    import shutil

    from cycle_optuna import report
    from workers_helpers import drop_synthetic_keys, write_study

    rows = ["sample,label,f0"] + [f"s{i},{'ab'[i % 2]},{i % 2 + 0.01 * t}" for i in range(40) for t in range(6)]
    made, moved = tmp_path / "made", tmp_path / "moved"
    made.mkdir()
    (made / "d.csv").write_text("\n".join(rows) + "\n")
    path = write_study(made, n_trials=2, epochs=1)
    path.write_text(drop_synthetic_keys(path.read_text()).replace("[data]\n", '[data]\nsource = "d.csv"\n'))
    api.run_study(path)
    before = api.best_record(path)
    assert before["test_accuracy"] is not None
    shutil.move(made, moved)  # the creator's paths no longer exist
    after = api.best_record(moved / "tiny.toml")
    assert after["test_accuracy"] == before["test_accuracy"] and after["n_test"] == before["n_test"]
    assert report.analyse(moved / "tiny.toml").test.accuracy == before["test_accuracy"]
    assert api.load_best_model(moved / "tiny.toml").trial_numbers == [t - 1 for t in before["model_cycles"]]
    # another file under the data's name is not the study's data, and is named as such
    (moved / "d.csv").write_text("\n".join(rows[:-6]) + "\n")
    rec = api.best_record(moved / "tiny.toml")
    assert rec["test_accuracy"] is None
    assert f"changed since it ran ({moved / 'd.csv'}: other content than data.source had)" in rec["test_error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_run_study_checks_what_run_checks_before_writing(tmp_path):
    """From Python as from the CLI: a CUDA device the machine lacks is refused before anything exists."""
    from workers_helpers import write_study

    path = write_study(tmp_path, n_trials=1, epochs=1)
    path.write_text(path.read_text().replace("threads = 1", 'threads = 1\ndevice = "cuda"'))
    with pytest.raises(ConfigError, match=r"tiny\.toml: .*cuda"):
        api.run_study(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


def test_run_study_shows_the_caller_no_warning_about_optunas_experimental_heartbeat(tmp_path):
    """The heartbeat (and its retry callback) is this package's choice: Optuna's ExperimentalWarning
    for it is noise to the caller (two of them at every run_study and load_study)."""
    import subprocess

    from workers_helpers import write_study

    path = write_study(tmp_path, n_trials=1, epochs=1)
    code = ("import warnings, cycle_optuna.api as a; warnings.simplefilter('always'); "
            f"a.run_study({str(path)!r}); a.run_study({str(path)!r}, n_trials=2); a.load_study({str(path)!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    assert len(load_study(path).trials) == 2  # it ran


def test_run_study_leaves_the_callers_threads_and_random_stream_as_they_were(tmp_path):
    """A notebook's torch.manual_seed(1) and thread count survive a run_study (training seeds the
    global generator with the study seed and sets its own threads)."""
    import torch

    from workers_helpers import write_study

    path = write_study(tmp_path, n_trials=1, epochs=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        torch.manual_seed(1)
        expected = torch.rand(3)
        torch.manual_seed(1)
        api.run_study(path)
        assert torch.get_num_threads() == 2
        assert torch.equal(torch.rand(3), expected)
    finally:
        torch.set_num_threads(threads)
    assert len(load_study(path).trials) == 1  # it ran


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_run_study_leaves_the_callers_cuda_random_stream_as_it_was(tmp_path):
    """Training on the GPU seeds every CUDA generator with the study seed: a notebook's CUDA stream
    was reseeded by run_study."""
    import torch

    from workers_helpers import write_study

    path = write_study(tmp_path, n_trials=1, epochs=1)
    path.write_text(path.read_text().replace("[train]\n", "[train]\ndevice = \"cuda\"\n", 1))
    torch.cuda.manual_seed_all(1)
    expected = torch.rand(3, device="cuda")
    torch.cuda.manual_seed_all(1)
    api.run_study(path)
    assert torch.equal(torch.rand(3, device="cuda"), expected)
    assert len(load_study(path).trials) == 1  # it ran


def test_run_study_says_when_the_study_already_holds_its_total(tmp_path, caplog):
    """The CLI prints that the study already holds its trials; run_study returned in silence, which
    reads as a run that finished."""
    from workers_helpers import write_study

    path = write_study(tmp_path, n_trials=1, epochs=1)
    api.run_study(path)
    caplog.clear()
    with caplog.at_level("WARNING", logger="cycle_optuna.api"):
        api.run_study(path)
        api.run_study(path, n_trials=1)
    said = [r.getMessage() for r in caplog.records if r.name == "cycle_optuna.api"]
    assert said == ["study 'tiny' already holds 1 trial and its total is 1: nothing to run; pass n_trials=2 or more "
                    "to grow it"] * 2
    caplog.clear()
    with caplog.at_level("WARNING", logger="cycle_optuna.api"):
        api.run_study(path, n_trials=2)
    assert not [r for r in caplog.records if r.name == "cycle_optuna.api"]
    assert len(load_study(path).trials) == 2


def test_run_study_does_not_say_nothing_to_run_when_a_lost_workers_trial_needs_a_retry(tmp_path, caplog, monkeypatch):
    """A worker killed mid-trial leaves it RUNNING: the study holds its total, yet the next run_study
    fails that trial and runs its retry. It said "nothing to run" and then ran a trial."""
    import signal

    from optuna.trial import TrialState

    from workers_helpers import start_cli, trials, wait_for, write_study

    path = write_study(tmp_path, n_trials=1, epochs=3)
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    victim = start_cli(["run", str(path)], pause=1.0)
    wait_for(lambda: any(t.state == TrialState.RUNNING and t.intermediate_values for t in trials(url)), 90,
             "a trial with a reported epoch")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    monkeypatch.setenv("CYCLE_OPTUNA_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("CYCLE_OPTUNA_GRACE_SECONDS", "3")
    with caplog.at_level("WARNING", logger="cycle_optuna.api"):
        api.run_study(path)
    assert not [r for r in caplog.records if "nothing to run" in r.getMessage()]
    assert [t.state for t in trials(url)] == [TrialState.FAIL, TrialState.COMPLETE]


def test_a_study_other_code_made_shows_its_own_parameters_only(tmp_path):
    """best_params and cycles() filled a foreign study's trials with this project's defaults (lr 5e-4,
    hidden_dim 64, ...) beside its real parameter, as if that were its baseline."""
    url = f"sqlite:///{tmp_path / 'foreign.db'}"
    foreign = optuna.create_study(study_name="foreign", storage=url)
    foreign.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.2) ** 2, n_trials=3)
    study = load_study("foreign", storage=url)
    assert best_params(study) == foreign.best_params
    assert [c.params for c in cycles(study)] == [t.params for t in foreign.trials]
    assert api.baseline_params(study) == {}


def test_run_study_refuses_an_in_memory_database(tmp_path):
    from workers_helpers import write_study

    path = write_study(tmp_path, n_trials=1, epochs=1)
    with pytest.raises(StorageError, match="in-memory database"):
        api.run_study(path, "sqlite://")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]  # no model trained and left behind


def test_a_test_file_changed_in_place_makes_the_held_out_score_unavailable(tmp_path, one_thread):
    """A test_source edited after the study ran changes no training statistic: its digest tells."""
    from workers_helpers import drop_synthetic_keys, write_study

    def rows(n: int, seed: int) -> list[str]:
        return [f"s{seed}_{i},{'ab'[i % 2]},{i % 2 + 0.01 * t + seed}" for i in range(n) for t in range(6)]

    (tmp_path / "train.csv").write_text("\n".join(["sample,label,f0", *rows(40, 0)]) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(["sample,label,f0", *rows(10, 1)]) + "\n")
    path = write_study(tmp_path, n_trials=1, epochs=1)
    path.write_text(drop_synthetic_keys(path.read_text()).replace(
        "[data]\n", '[data]\nsource = "train.csv"\ntest_source = "test.csv"\n'))
    api.run_study(path)
    assert api.best_record(path)["n_test"] == 10
    (tmp_path / "test.csv").write_text("\n".join(["sample,label,f0", *rows(6, 1)]) + "\n")
    rec = api.best_record(path)
    assert rec["test_accuracy"] is None and "changed since it ran" in rec["test_error"]
    assert str(tmp_path / "test.csv") in rec["test_error"]
    with pytest.raises(StorageError, match="test_source"):
        api.held_out_score(path)


def test_a_switch_flip_is_said_once_in_the_key_change():
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from cycle_optuna import api

    dists = {"instance_norm": CategoricalDistribution([False, True]), "lr": FloatDistribution(1e-4, 1e-2, log=True)}
    parent = optuna.trial.create_trial(params={"instance_norm": False, "lr": 5e-4}, distributions=dists, value=1.0)
    flip = optuna.trial.create_trial(params={"instance_norm": True, "lr": 5e-4}, distributions=dists, value=0.9,
                                     user_attrs={"cycle_move": "instance_norm False->True"})
    assert api._key_change(flip, parent, {}) == "instance_norm False -> True"
    step = optuna.trial.create_trial(params={"instance_norm": False, "lr": 1e-3}, distributions=dists, value=0.9,
                                     user_attrs={"cycle_move": "lr x2"})
    assert api._key_change(step, parent, {}) == "lr x2: lr 0.0005 -> 0.001"  # a move with more to say keeps it


def test_the_first_trial_of_another_programs_study_is_the_first_trial_not_a_change_from_none(tmp_path):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    study = optuna.create_study(study_name="other", storage=url)
    study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.2) ** 2 + t.suggest_int("k", 1, 3), n_trials=3)
    rows = cycles("other", storage=url)
    assert rows[0].key_change == "first trial"  # it was "x None -> 0.7588, k None -> 2"
    assert "None" not in rows[1].key_change and rows[1].key_change.startswith("x ")


def test_the_docs_qualified_names_work_after_import_cycle_optuna_alone():
    """docs/python-api.md writes cycle_optuna.export.frame(...), cycle_optuna.api.held_out_score(...):
    in a fresh process `import cycle_optuna` must be enough."""
    import subprocess

    code = ("import cycle_optuna as c; print(c.export.frame.__name__, c.api.held_out_score.__name__, "
            "c.predict.predict_file.__name__, c.report.write_report.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["frame", "held_out_score", "predict_file", "write_report"]


def test_dir_of_the_package_lists_its_lazy_exports_before_any_is_used():
    """`dir(cycle_optuna)` (an editor's or IPython's completion) in a fresh process names the public
    functions and the modules the docs use, though none of them is imported yet."""
    import subprocess

    code = "import sys, cycle_optuna as c; print(' '.join(dir(c))); print('cycle_optuna.api' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names, imported = proc.stdout.splitlines()
    assert {"load_best_model", "run_study", "CycleSampler", "refit", "export", "predict", "report"} <= set(names.split())
    assert imported == "False"  # listing them imported nothing
    assert not {"importlib", "Any", "TYPE_CHECKING", "annotations"} & set(names.split())  # the module's own helpers


def test_queries_and_dashboard_name_a_wrong_argument(tmp_path):
    """A study file's path where a study was expected, the database given as the study, a port as
    text: one clear error naming the argument, not an AttributeError from inside."""
    from cycle_optuna import dashboard
    from workers_helpers import write_study

    path = write_study(tmp_path, n_trials=1, epochs=1)
    api.run_study(path)
    assert api.study_config(path).study.name == "tiny" and api.baseline_params(path)["lr"] > 0
    assert api.study_artifact_dir(path) == tmp_path / "tiny-artifacts"
    with pytest.raises(ConfigError, match=r"tiny\.db: that is a database, not a study file; .*storage='sqlite:///"):
        api.load_study(tmp_path / "tiny.db")
    for kwargs, error, words in ((dict(port="8080"), ValueError, "port: expected a port number 0-65535, got '8080'"),
                                 (dict(port=70000), ValueError, "port: expected a port number"),
                                 (dict(host=123), TypeError, "host: expected a host name"),
                                 (dict(storage=tmp_path / "tiny.db"), TypeError, "storage: expected a URL string")):
        with pytest.raises(error, match=re.escape(words)):
            dashboard.make_dashboard(path, **kwargs)
