"""`cycle-optuna refit`: the best cycles' configurations trained on all training series, used by
best / predict / load_best_model while they are of the best cycles, and nothing left half-written."""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from cycle_optuna import api, cli, space
from cycle_optuna.data import load_study_data
from cycle_optuna.errors import StorageError
from cycle_optuna.train import train_and_evaluate
from workers_helpers import fill_disk, small_tmpfs, start_cli, wait_for, worker_env, write_study


def _study(tmp_path: Path, capsys) -> Path:
    """Four completed cycles of the tiny study (threads = 1, no pruning), models kept for the best three."""
    path = write_study(tmp_path, n_trials=4, epochs=3, n_samples=80)
    assert cli.main(["run", str(path)]) == 0
    capsys.readouterr()
    return path


def _refit_files(path: Path) -> list[str]:
    return sorted(p.name for p in (path.parent / "tiny-artifacts").glob("refit-*"))


def test_refit_trains_the_best_cycles_on_every_training_series_and_the_best_model_is_then_theirs(
        tmp_path: Path, capsys, one_thread):
    path = _study(tmp_path, capsys)
    own = api.load_best_model(path)
    assert not own.refit and len(own.trial_numbers) == 3
    assert cli.main(["refit", str(path)]) == 0
    said = capsys.readouterr().out
    study = api.load_study(path)
    data = load_study_data(api.study_config(study))
    n_all = len(data.y_train) + len(data.y_val)
    assert f"trained on all {n_all} training series ({len(data.y_train)} training + {len(data.y_val)} validation)" in said
    assert "now use the refit model (mean of cycles " in said and "held-out test accuracy" in said
    rec = study.user_attrs[api.REFIT_ATTR]
    assert rec["trials"] == own.trial_numbers and rec["series"] == n_all and len(rec["artifacts"]) == 3
    assert _refit_files(path) == sorted(rec["artifacts"])
    first_files = set(rec["artifacts"])

    model = api.load_best_model(path)
    assert model.refit and model.trial_numbers == own.trial_numbers
    # each member is its cycle's configuration trained on training + validation, the last epoch kept
    cfg = api.study_config(study)
    x, y = data.pooled()
    full = dataclasses.replace(data, x_train=x, y_train=y, fold_ids=None)
    best = next(t for t in study.trials if t.number == own.trial_numbers[0])
    direct = train_and_evaluate(full, space.to_hyperparams(cfg, best.params),
                                dataclasses.replace(cfg.train, early_stopping_patience=0), seed=cfg.study.seed,
                                last_weights=True).model
    first = model.net.nets[0].state_dict()
    assert all(torch.equal(first[k], v) for k, v in direct.state_dict().items())
    assert not torch.equal(first["head.weight"], own.net.nets[0].state_dict()["head.weight"])

    assert cli.main(["best", str(path), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["model_refit"] is True and rec["model_cycles"] == [n + 1 for n in own.trial_numbers]
    assert any("(refit)" in b["line"] for b in rec["baselines"])
    x_new = np.random.default_rng(0).normal(size=(5, 4, 2))
    assert np.allclose(model.predict_proba(x_new), api.load_best_model(path).predict_proba(x_new))
    assert cli.main(["report", str(path), "-o", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "refit: trained again on all training series" in text and "(refit)) scored" in text
    assert "asked for" not in said  # three asked (the study's ensemble), three refit
    # a second refit replaces the first: its files go once the study names the new ones; asked for
    # more cycles than kept a model, it says how many it refits
    capsys.readouterr()
    assert cli.main(["refit", str(path), "--no-test", "--ensemble", "9"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    again = api.load_study(path).user_attrs[api.REFIT_ATTR]["artifacts"]
    assert f"(of the 9 asked for, the study has {len(again)} completed cycles that saved a model)" in said, said
    assert _refit_files(path) == sorted(again) and not set(again) & first_files


def test_the_refit_model_serves_only_the_cycles_it_was_made_of(tmp_path: Path, capsys, one_thread):
    path = _study(tmp_path, capsys)
    with pytest.raises(StorageError, match="has no refit model: run 'cycle-optuna refit STUDY.toml'"):
        api.load_best_model(path, refit=True)
    assert cli.main(["best", str(path)]) == 0  # a refit is not a sure gain: best does not urge one
    assert "refit" not in capsys.readouterr().out
    assert cli.main(["refit", str(path), "--ensemble", "1", "--no-test"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    alone = api.load_best_model(path, ensemble=1)
    assert alone.refit and len(alone.trial_numbers) == 1
    assert not api.load_best_model(path, ensemble=1, refit=False).refit
    three = api.load_best_model(path)  # the study's ensemble of 3: not what was refit
    assert not three.refit and len(three.trial_numbers) == 3
    cycles = ", ".join(str(n + 1) for n in three.trial_numbers)
    # it said so: the claim that best and predict now use it was false here
    assert said.endswith(f"stored: load_best_model(ensemble=1) uses the refit model (cycle {alone.trial_numbers[0] + 1}); "
                         f"best, predict and report keep the mean of cycles {cycles} ([study] ensemble = 3), not refit"), said
    with pytest.raises(StorageError, match=rf"refit model is of cycles {alone.trial_numbers[0] + 1}, but the best "
                                           rf"model averages cycles {cycles}: run 'cycle-optuna refit STUDY.toml' again"):
        api.load_best_model(path, refit=True)
    assert cli.main(["best", str(path)]) == 0
    assert f"run 'cycle-optuna refit {path}' again" in capsys.readouterr().out.replace("\n", "")


def test_a_lost_runner_up_model_leaves_the_best_model_of_the_others(tmp_path: Path, capsys, caplog, one_thread):
    path = _study(tmp_path, capsys)
    three = api.load_best_model(path)
    study = api.load_study(path)
    by_number = {t.number: t for t in study.trials}
    store = path.parent / "tiny-artifacts"
    (store / by_number[three.trial_numbers[2]].user_attrs[api.MODEL_ATTR]).unlink()
    two = api.load_best_model(path)
    assert two.trial_numbers == three.trial_numbers[:2] and not two.refit
    assert "is missing from" in caplog.text and "the best model averages the other cycles' models" in caplog.text
    assert cli.main(["predict", str(path), str(_npz(tmp_path))]) == 0
    (store / by_number[three.trial_numbers[0]].user_attrs[api.MODEL_ATTR]).unlink()  # the best cycle's own: no stand-in
    with pytest.raises(StorageError, match=rf"of cycle {three.trial_numbers[0] + 1} is missing from"):
        api.load_best_model(path)


def test_a_refit_after_the_artifact_folder_was_lost_makes_a_best_model_again(tmp_path: Path, capsys, one_thread):
    import shutil

    path = _study(tmp_path, capsys)
    shutil.rmtree(path.parent / "tiny-artifacts")
    with pytest.raises(StorageError, match=r"artifact directory of study 'tiny' not found: .* \(moved\? set \$CYCLE_OPTUNA_ARTIFACT_DIR to where it is now\)$"):
        api.load_best_model(path)
    assert cli.main(["refit", str(path), "--no-test"]) == 0
    assert "tiny-artifacts is missing (the cycles' models with it): the refit models go to a new one" in capsys.readouterr().out
    assert api.load_best_model(path).refit and len(_refit_files(path)) == 3
    # a refit of one cycle: best's 3-cycle model cannot be loaded now (its cycles' own files are gone); the
    # refit is stored all the same, and says so, where its message's look at best's model made it exit 2
    assert cli.main(["refit", str(path), "--no-test", "--ensemble", "1"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    one = api.load_best_model(path, ensemble=1)
    assert f"stored: load_best_model(ensemble=1) uses the refit model (cycle {one.trial_numbers[0] + 1}); best, " in said, said
    assert one.refit


def test_refit_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path: Path, capsys):
    path = write_study(tmp_path)
    assert cli.main(["refit", str(path)]) == 2  # no study yet
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no study database" in err
    assert not (tmp_path / "tiny.db").exists() and not (tmp_path / "tiny-artifacts").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["refit", str(path), "--ensemble", "0"])
    assert e.value.code == 2 and "--ensemble: must be a positive integer, got 0" in capsys.readouterr().err


def test_a_refit_from_python_whose_callback_fails_leaves_no_claim_on_the_study(tmp_path: Path, capsys, one_thread):
    """A notebook's bad `say` must not leave the study marked as being refit: every other refit
    was refused while that kernel lived."""
    from cycle_optuna.refitting import refit

    path = _study(tmp_path, capsys)
    with pytest.raises(TypeError, match="say: expected a function, got str"):
        refit(path, say="progress.txt")
    assert api.REFIT_PENDING_ATTR not in api.load_study(path).user_attrs  # refused before the claim

    def broken(line: str) -> None:
        raise RuntimeError("the user's logger is down")

    with pytest.raises(RuntimeError, match="logger is down"):
        refit(path, say=broken)
    assert api.load_study(path).user_attrs.get(api.REFIT_PENDING_ATTR) is None and _refit_files(path) == []
    assert cli.main(["refit", str(path)]) == 0  # another refit is not refused
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    refit(path, say=None)  # None: silent; the caller's random stream is left as it was
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_refit_stopped_after_writing_a_model_leaves_the_study_as_it_was(tmp_path: Path, capsys, sig, one_thread):
    path = _study(tmp_path, capsys)
    log = tmp_path / "refit.log"
    proc = start_cli(["refit", str(path)], log=log, env=worker_env(CYCLE_OPTUNA_TEST_PAUSE_REFIT_MODEL_WRITTEN="60"))
    wait_for(lambda: "paused refit model written" in log.read_text(), 120, "the refit's first model written")
    assert len(_refit_files(path)) == 1
    proc.send_signal(sig)
    assert proc.wait(60) == 128 + sig, log.read_text()
    assert _refit_files(path) == []  # removed: no study attr named it yet
    assert api.REFIT_ATTR not in api.load_study(path).user_attrs
    assert not api.load_best_model(path).refit


def test_a_refit_killed_after_writing_a_model_changes_nothing_a_reader_sees(tmp_path: Path, capsys, one_thread):
    path = _study(tmp_path, capsys)
    log = tmp_path / "refit.log"
    proc = start_cli(["refit", str(path)], log=log, env=worker_env(CYCLE_OPTUNA_TEST_PAUSE_REFIT_MODEL_WRITTEN="60"))
    wait_for(lambda: "paused refit model written" in log.read_text(), 120, "the refit's first model written")
    left = _refit_files(path)
    assert len(left) == 1
    # while it runs, a second refit of the study on this machine is refused, with nothing written
    assert cli.main(["refit", str(path), "--no-test"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"is being refit by process {socket.gethostname()}:{proc.pid} on this machine" in err, err
    assert _refit_files(path) == left
    proc.kill()
    proc.wait(30)
    assert api.REFIT_ATTR not in api.load_study(path).user_attrs
    assert not api.load_best_model(path).refit  # the cycles' own models, whole
    assert cli.main(["refit", str(path), "--no-test"]) == 0  # and a new refit completes
    assert "removed 1 model file of a refit that was stopped before it finished" in capsys.readouterr().out
    assert api.load_best_model(path).refit
    study = api.load_study(path)
    assert _refit_files(path) == sorted(study.user_attrs[api.REFIT_ATTR]["artifacts"])  # the killed one's file went
    assert study.user_attrs[api.REFIT_PENDING_ATTR] is None


def test_a_lost_refit_file_falls_back_to_the_cycles_own_models(tmp_path: Path, capsys, caplog, one_thread):
    path = _study(tmp_path, capsys)
    assert cli.main(["refit", str(path), "--no-test"]) == 0
    capsys.readouterr()
    (path.parent / "tiny-artifacts" / _refit_files(path)[1]).unlink()
    model = api.load_best_model(path)
    assert not model.refit and len(model.trial_numbers) == 3
    assert "is missing from" in caplog.text and "using the cycles' own models instead" in caplog.text
    with pytest.raises(StorageError, match="refit model of cycle .* is missing from"):
        api.load_best_model(path, refit=True)
    assert cli.main(["best", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_refit"] is False


def test_a_full_artifact_disk_is_refused_before_training(tmp_path: Path, capsys, monkeypatch, one_thread):
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        monkeypatch.setenv("CYCLE_OPTUNA_ARTIFACT_DIR", str(disk / "artifacts"))
        path = _study(tmp_path, capsys)
        fill_disk(disk)
        assert cli.main(["refit", str(path)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"cannot write {disk / 'artifacts'}: No space left" in err, err
        assert not list((disk / "artifacts").glob("refit-*"))
        assert api.REFIT_ATTR not in api.load_study(path).user_attrs


def test_refit_of_a_postgresql_study_is_what_its_readers_load(tmp_path: Path, capsys, pg_url: str, one_thread):
    path = write_study(tmp_path, n_trials=3, epochs=2, n_samples=60)
    assert cli.main(["run", str(path), "--storage", pg_url]) == 0
    assert cli.main(["refit", str(path), "--storage", pg_url]) == 0
    capsys.readouterr()
    model = api.load_best_model(path, storage=pg_url)
    assert model.refit and api.load_study(path, storage=pg_url).user_attrs[api.REFIT_ATTR]["trials"] == model.trial_numbers
    assert cli.main(["predict", str(path), "--storage", pg_url, str(_npz(tmp_path))]) == 0
    assert "(refit)" in capsys.readouterr().err


def test_refit_with_a_read_only_database_role_is_refused_before_training(tmp_path: Path, capsys, pg_url: str):
    """A role that may read the study but not write it: one line naming the study and the database's
    reason, exit 2, before any training and with no model file written."""
    from conftest import pg_reader

    path = write_study(tmp_path, n_trials=2, epochs=1, n_samples=60)
    assert cli.main(["run", str(path), "--storage", pg_url]) == 0
    capsys.readouterr()
    with pg_reader(pg_url) as reader:
        assert cli.main(["refit", str(path), "--storage", reader]) == 2
        out = capsys.readouterr()
        assert out.out == "" and len(out.err.strip().splitlines()) == 1, out
        assert "cannot write study 'tiny'" in out.err and "permission denied" in out.err, out.err
        assert _refit_files(path) == []
        assert api.REFIT_PENDING_ATTR not in api.load_study(path, storage=pg_url).user_attrs


def _npz(tmp_path: Path) -> Path:
    path = tmp_path / "new.npz"
    np.savez(path, X=np.random.default_rng(1).normal(size=(4, 4, 2)))
    return path


def test_a_cross_validated_cycle_is_refit_as_as_many_networks_each_on_every_series(tmp_path: Path, capsys, one_thread):
    """Under k-fold cross-validation a cycle's model averages its k folds' networks; its refit
    averages k networks too, each trained on every series (seeds seed..seed+k-1)."""
    path = write_study(tmp_path, n_trials=2, epochs=2, n_samples=60)
    path.write_text(path.read_text().replace("folds = 1 ", "folds = 3 "))
    assert cli.main(["run", str(path)]) == 0
    assert cli.main(["refit", str(path), "--ensemble", "1", "--no-test"]) == 0
    assert "each refit model averages 3 networks" in capsys.readouterr().out
    study = api.load_study(path)
    own, model = api.load_best_model(path, ensemble=1, refit=False), api.load_best_model(path, ensemble=1)
    assert model.refit and len(own.net.nets) == len(model.net.nets) == 3
    cfg, data = api.study_config(study), load_study_data(api.study_config(study))
    x, y = data.pooled()
    full = dataclasses.replace(data, x_train=x, y_train=y, fold_ids=None)
    third = train_and_evaluate(full, space.to_hyperparams(cfg, study.best_trial.params),
                               dataclasses.replace(cfg.train, early_stopping_patience=0), seed=cfg.study.seed + 2,
                               last_weights=True).model
    assert all(torch.equal(model.net.nets[2].state_dict()[k], v) for k, v in third.state_dict().items())
