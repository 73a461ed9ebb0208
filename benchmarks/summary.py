"""What the model's summary branch (``summary_features = true``) costs a trial, at three series shapes.

    .venv/bin/python benchmarks/summary.py             # three shapes, 3 rounds (~6 min on 2 cores)
    .venv/bin/python benchmarks/summary.py --quick     # seconds: a smoke run on tiny sizes

Three variants of the same trial (`train_and_evaluate`, the baseline model, `--epochs` epochs of
the default `min_epoch_samples`, early stopping off, 1 thread, synthetic data of the shape): the branch off; on, with each data set's statistics computed once per
trial and sliced per batch (what training does); and on, recomputed from every batch in the forward
pass (what training did before, and still does where `augment_jitter`/`augment_scale` change the
series every step). The variants alternate within each round (the order rotates) and each ratio is
the median of the per-round paired ratios of seconds per trial against "off"; min..max is the noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from cycle_optuna import train
from cycle_optuna.config import DataConfig, Hyperparams, TrainConfig
from cycle_optuna.data import load_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine  # noqa: E402

# (steps, channels, series): short, PLAID's length, Watch's length and channels
SHAPES = [(16, 8, 400), (1344, 1, 300), (2618, 6, 200)]
QUICK = [(16, 4, 60), (200, 2, 60)]


def _trial(data, hp: Hyperparams, cfg: TrainConfig, per_step: bool) -> float:
    real = train.summaries
    if per_step:
        train.summaries = lambda model, x: None  # the forward pass computes them from each batch
    try:
        t0 = time.perf_counter()
        train.train_and_evaluate(data, hp, cfg, seed=0)
        return time.perf_counter() - t0
    finally:
        train.summaries = real


def bench(steps: int, channels: int, series: int, rounds: int, epochs: int) -> dict[str, list[float]]:
    data = load_task(DataConfig(seq_len=steps, n_features=channels, n_samples=series, folds=1), 0)
    cfg = TrainConfig(epochs=epochs, early_stopping_patience=0, device="cpu", threads=1)
    on = dataclasses.replace(Hyperparams(), summary_features=True)
    variants = {"off": (Hyperparams(), False), "on": (on, False), "on, per step": (on, True)}
    for hp, per_step in variants.values():  # warm-up
        _trial(data, hp, cfg, per_step)
    secs: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for r in range(rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            hp, per_step = variants[v]
            secs[v].append(_trial(data, hp, cfg, per_step))
    return secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: a smoke run")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds per shape (default 3, quick 2)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 4, quick 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rounds = args.rounds or (2 if args.quick else 3)
    epochs = args.epochs or (1 if args.quick else 4)
    print(_machine.describe())
    print(f"{epochs} epochs per trial, {rounds} rounds; seconds per trial against the branch off, median (min..max)")
    print("| series (steps x channels) | off: s per trial | on / off | on, per step / off |")
    print("|---|---|---|---|")
    for steps, channels, series in QUICK if args.quick else SHAPES:
        secs = bench(steps, channels, series, rounds, epochs)
        cells = []
        for v in ("on", "on, per step"):
            ratios = [a / b for a, b in zip(secs[v], secs["off"])]
            if v == "on":
                ratios_on = ratios
            cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f})")
        print(f"| {steps} x {channels} ({series} series) | {statistics.median(secs['off']):.2f} | {cells[0]} | {cells[1]} |",
              flush=True)
    print(f"ratio on/off seconds per trial at the longest shape: {statistics.median(ratios_on):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
