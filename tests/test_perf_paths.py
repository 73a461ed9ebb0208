"""Hot-loop properties that need no timing: host syncs, batch slicing, inference mode, devices, threads.

The accelerator path of the non-finite guard (read the divergence flag every GUARD_CHECK_STEPS
steps, skip bad updates on the device) runs here on the CPU by patching the check interval, so it
is tested without a GPU; the one test that needs CUDA is skipped without it.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from cycle_optuna import train, worker
from cycle_optuna.config import DataConfig, Hyperparams, TrainConfig
from cycle_optuna.data import load_task

HP = Hyperparams(lr=3e-3, batch_size=16, hidden_dim=16, n_layers=1, n_heads=2, dropout=0.1)
CFG = TrainConfig(epochs=2, schedule="constant", warmup_epochs=0, early_stopping_patience=0, device="cpu",
                  min_epoch_samples=0)  # one pass per epoch: the step counts below assume it
EVERY = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return load_task(DataConfig(n_samples=300, seq_len=8, n_features=4), 0)  # 210 training rows: 14 steps


@pytest.fixture
def accelerator_path(monkeypatch):
    """The guard's accelerator schedule (a host read every EVERY steps), on the CPU."""
    monkeypatch.setattr(train, "_guard_check_steps", lambda device: EVERY)


def _with_nans(data, rows):
    x = data.x_train.clone()
    x[rows, 1, 0] = float("inf")  # NaN marks missing data (masked); inf poisons the batch
    return dataclasses.replace(data, x_train=x)


def _outcome(r):
    weights = {k: v.clone() for k, v in r.model.state_dict().items()}
    return [(m.train_loss, m.val_loss, m.nan_batches) for m in r.history], r.diverged, r.nan_batches, weights


def _same(a, b):
    assert a[:3] == b[:3]
    assert all(torch.equal(a[3][k], b[3][k]) for k in a[3])


class HostReads:
    """Counts tensor -> Python reads (each one a device sync on an accelerator)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **kw):
                self.n += 1
                return _original(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_deferred_guard_trains_exactly_as_the_per_step_guard(data, monkeypatch):
    nan = _with_nans(data, [3, 40, 77, 150])
    per_step = _outcome(train.train_and_evaluate(nan, HP, CFG, seed=0))
    monkeypatch.setattr(train, "_guard_check_steps", lambda device: EVERY)
    deferred = _outcome(train.train_and_evaluate(nan, HP, CFG, seed=0))
    assert per_step[2] >= 4  # each bad row skips its batch (two may share one)
    _same(per_step, deferred)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_deferred_divergence_stops_with_the_per_step_weights(data, monkeypatch, optimizer):
    """After max_bad_batches bad steps the later steps are skipped on the device, so reading the
    flag late changes nothing but the time spent."""
    bad = _with_nans(data, list(range(64)))  # rows 0..63 poison the first batches of each shuffle
    cfg = dataclasses.replace(CFG, optimizer=optimizer, max_bad_batches=2, epochs=3)
    per_step = train.train_and_evaluate(bad, HP, cfg, seed=0)
    monkeypatch.setattr(train, "_guard_check_steps", lambda device: EVERY)
    deferred = train.train_and_evaluate(bad, HP, cfg, seed=0)
    assert per_step.diverged and deferred.diverged
    _same(_outcome(per_step), _outcome(deferred))


def test_accelerator_path_reads_the_host_once_per_check_interval(data, monkeypatch, accelerator_path):
    steps = -(-len(data.x_train) // HP.batch_size)
    reads = HostReads(monkeypatch)
    train.train_and_evaluate(data, HP, dataclasses.replace(CFG, epochs=1), seed=0)
    # -(-steps // EVERY) flag reads (the last step checks too), a handful per epoch for metrics and
    # validation, none per step.
    assert reads.n <= -(-steps // EVERY) + 8 < steps


def test_host_read_counter_sees_the_per_step_reads(data, monkeypatch):
    """The counter above is not blind: the CPU schedule (and SGD, which has no found_inf) read every step."""
    steps = -(-len(data.x_train) // HP.batch_size)
    reads = HostReads(monkeypatch)
    train.train_and_evaluate(data, HP, dataclasses.replace(CFG, epochs=1), seed=0)
    assert reads.n >= steps
    monkeypatch.setattr(train, "_guard_check_steps", lambda device: EVERY)
    reads.n = 0
    train.train_and_evaluate(data, HP, dataclasses.replace(CFG, epochs=1, optimizer="sgd"), seed=0)
    assert reads.n >= steps


def test_fused_adam_skips_on_device_other_optimizers_on_host(data):
    model = train.build_model(data, HP, CFG)
    for name, masked in [("adamw", True), ("adam", True), ("sgd", False), ("lion", False)]:
        opt, _ = train.make_optimizer(model, HP, dataclasses.replace(CFG, optimizer=name))
        assert train._masks_on_device(opt) is masked, name


def test_guard_reads_every_step_on_cpu_and_every_n_on_accelerators():
    assert train._guard_check_steps(torch.device("cpu")) == 1
    assert train._guard_check_steps(torch.device("cuda")) == train.GUARD_CHECK_STEPS > 1


def _record_forwards(monkeypatch):
    """(training, inference_mode, input) of every forward of the model the loop builds."""
    calls = []
    build = train.build_model

    def recording(*a, **kw):
        model = build(*a, **kw)
        model.register_forward_pre_hook(
            lambda m, args: calls.append((m.training, torch.is_inference_mode_enabled(), args[0])))
        return model

    monkeypatch.setattr(train, "build_model", recording)
    return calls


def test_evaluation_runs_under_inference_mode_and_training_does_not(data, monkeypatch):
    calls = _record_forwards(monkeypatch)
    train.train_and_evaluate(data, HP, CFG, seed=0)
    evals = [c for c in calls if not c[0]]
    trains = [c for c in calls if c[0]]
    assert evals and trains
    assert all(inference for _, inference, _ in evals)
    assert not any(inference for _, inference, _ in trains)


def test_an_epochs_batches_are_slices_of_one_shuffled_copy(data, monkeypatch):
    calls = _record_forwards(monkeypatch)
    train.train_and_evaluate(data, HP, dataclasses.replace(CFG, epochs=1), seed=0)
    batches = [x for training, _, x in calls if training]
    assert len(batches) == -(-len(data.x_train) // HP.batch_size)
    assert len({x.untyped_storage().data_ptr() for x in batches}) == 1  # views, no per-step gather
    assert all(x.is_contiguous() for x in batches)


def test_auto_device_is_cpu_here_and_cuda_when_torch_sees_one(data, monkeypatch):
    r = train.train_and_evaluate(data, HP, dataclasses.replace(CFG, epochs=1, device="auto"), seed=0)
    if not torch.cuda.is_available():
        assert next(r.model.parameters()).device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.resolve_device("auto") == torch.device("cuda")
    assert train.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("cores", [1, 2, 4, 16])
def test_k_workers_times_threads_fit_the_cores(monkeypatch, cores):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    for k in range(1, 2 * cores + 1):
        threads = worker.default_threads(k)
        assert threads >= 1
        assert k * threads <= cores or threads == 1  # more workers than cores: one thread each
    assert worker.default_threads(1) == cores


def test_local_workers_get_their_share_of_the_cores(monkeypatch, tmp_path):
    envs = []

    class FakePopen:
        def __init__(self, args, env, **kw):
            envs.append(env)

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(worker.subprocess, "Popen", FakePopen)
    worker.start_local_workers("study.toml", "sqlite:///x.db", 3, n_trials=None, log_prefix=str(tmp_path / "w"))
    assert len(envs) == 3
    assert {int(e[worker.THREADS_ENV_VAR]) for e in envs} == {2}  # 3 x 2 <= 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_epoch_syncs_once_per_check_interval(data):
    steps = -(-len(data.x_train) // HP.batch_size)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as record:
            train.train_and_evaluate(data, HP, dataclasses.replace(CFG, epochs=1, device="cuda"), seed=0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    # the flag reads, the epoch's metrics, validation's; and at most two inside torch's own start-up
    # (an H200 with torch 2.11 showed 3 in all on a process's first call, 2 on later ones)
    assert len(syncs) <= -(-steps // train.GUARD_CHECK_STEPS) + 4 < steps


def test_accelerator_path_epoch_reads_the_host_once_for_metrics_and_once_for_validation(data, monkeypatch,
                                                                                     accelerator_path):
    """Per epoch: one divergence-flag read per EVERY steps before the last, one read of the epoch's
    metrics (the last step's flag included), one of validation's; none at start-up."""
    steps = -(-len(data.x_train) // HP.batch_size)
    reads = HostReads(monkeypatch)
    train.train_and_evaluate(data, HP, dataclasses.replace(CFG, epochs=2), seed=0)
    assert reads.n == 2 * ((steps - 1) // EVERY + 2)
