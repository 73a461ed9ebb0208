"""Placing workers on GPUs, with a faked list of visible devices (the machine here has none)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cycle_optuna import config, placement, status, storage, worker
from cycle_optuna.cli import main
from cycle_optuna.errors import ConfigError
from workers_helpers import write_study

FOUR = ["0", "1", "2", "3"]


def test_workers_spread_over_every_visible_gpu_by_default():
    assert placement.plan(6, available=FOUR) == ["0", "1", "2", "3", "0", "1"]
    assert placement.plan(None, available=FOUR) == ["0"]  # one worker unless asked for more


def test_gpus_choose_among_the_visible_ones_by_number():
    assert placement.plan(4, available=FOUR, gpus=[0, 2]) == ["0", "2", "0", "2"]
    # numbers index what this process sees, so a restricted parent passes its own entries on
    assert placement.plan(2, available=["GPU-a1", "GPU-b2"], gpus=[1]) == ["GPU-b2", "GPU-b2"]


def test_workers_per_gpu_sets_the_count_or_caps_it():
    assert placement.plan(None, available=FOUR, gpus=[1, 3], per_gpu=3) == ["1", "3"] * 3
    assert placement.plan(5, available=FOUR, per_gpu=2) == ["0", "1", "2", "3", "0"]
    with pytest.raises(ConfigError, match="--workers 9 is more than --workers-per-gpu 2 on 4 GPU"):
        placement.plan(9, available=FOUR, per_gpu=2)


def test_cpu_workers_stay_as_they_are_and_gpu_flags_need_a_gpu():
    assert placement.plan(3, available=[]) == [None, None, None]
    with pytest.raises(ConfigError, match="no CUDA device"):
        placement.plan(2, available=[], gpus=[0])
    with pytest.raises(ConfigError, match="no CUDA device"):
        placement.plan(None, available=[], per_gpu=2)
    with pytest.raises(ConfigError, match="there is no GPU 4; torch sees 4 \\(0-3\\)"):
        placement.plan(2, available=FOUR, gpus=[0, 4])


def test_parse_gpus():
    assert placement.parse_gpus("0,2") == [0, 2]
    for bad in ("a", "0,,1", "-1", "1,1"):
        with pytest.raises(ValueError, match=repr(bad)):
            placement.parse_gpus(bad)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(placement, "cuda_device_count", lambda: 8)  # a machine with 8 GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert placement.visible_gpus() == ["2", "3"]
    assert placement.device_label("cuda") == "gpu 2" and placement.device_label("cpu") == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,3")  # CUDA ignores everything from an invalid entry
    assert placement.visible_gpus() == ["1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert placement.visible_gpus() == []
    monkeypatch.setattr(placement, "cuda_device_count", lambda: 1)  # names two, torch sees one
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert placement.visible_gpus() == ["0"]


def test_each_spawned_worker_gets_its_gpu(monkeypatch, tmp_path):
    envs = []

    class FakePopen:  # records the environment instead of starting a process
        def __init__(self, args, env, **kw):
            envs.append(env)

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(worker.subprocess, "Popen", FakePopen)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(worker.THREADS_ENV_VAR, raising=False)
    gpus = placement.plan(4, available=FOUR, gpus=[1, 3])
    worker.start_local_workers("s.toml", "sqlite:///x.db", 4, n_trials=None, log_prefix=str(tmp_path / "w"), gpus=gpus)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["1", "3", "1", "3"]
    assert {int(e[worker.THREADS_ENV_VAR]) for e in envs} == {2}  # CPU threads as without GPUs
    envs.clear()
    worker.start_local_workers("s.toml", "sqlite:///x.db", 2, n_trials=None, log_prefix=str(tmp_path / "w"))
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in envs)
    assert {int(e[worker.THREADS_ENV_VAR]) for e in envs} == {4}
    envs.clear()  # threads the user fixed for every worker are theirs, not cores / workers
    monkeypatch.setenv(worker.THREADS_ENV_VAR, "1")
    worker.start_local_workers("s.toml", "sqlite:///x.db", 2, n_trials=None, log_prefix=str(tmp_path / "w"))
    assert {e[worker.THREADS_ENV_VAR] for e in envs} == {"1"}


@pytest.mark.parametrize("env", ["", "0"])
@pytest.mark.parametrize("args", [["run", "--gpus", "0"], ["run", "--workers-per-gpu", "2"], ["worker", "--gpus", "0"]])
def test_gpu_flags_without_a_gpu_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, args, env):
    if env and __import__("torch").cuda.is_available():
        pytest.skip("CUDA_VISIBLE_DEVICES=0 names a real GPU on this machine")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)  # "": no GPU whatever the machine has; "0" on a machine without one
    study = write_study(tmp_path)
    code = main([args[0], str(study), *args[1:]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no CUDA device" in err
    assert not list(tmp_path.glob("*.db"))


def test_a_worker_runs_on_one_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(placement, "cuda_device_count", lambda: 2)  # a machine with 2 GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert main(["worker", str(write_study(tmp_path)), "--gpus", "0,1"]) == 2
    assert "a worker runs on one GPU" in capsys.readouterr().err


def test_status_shows_each_running_trials_device(tmp_path: Path):
    cfg = config.load(write_study(tmp_path, n_trials=1, epochs=2))
    seen = []

    def look(trial, metrics):
        s = status.collect(trial.study, 1)
        seen.append([(r.worker, r.device) for r in s.running])
        from rich.console import Console

        console = Console(record=True, width=200)
        console.print(status.render(s))
        seen.append(console.export_text())

    worker.run_worker(cfg, storage.resolve_url(cfg), hooks=worker.Hooks(on_epoch=look))
    assert seen[0] == [(storage.worker_id(), "cpu")]
    assert "device" in seen[1] and "cpu" in seen[1]
