"""What the model's optional branches (`summary_features`, `step_conv`) cost a trial, at three series shapes.

    .venv/bin/python benchmarks/branches.py             # three shapes, 3 rounds (~10 min on 2 cores)
    .venv/bin/python benchmarks/branches.py --quick     # seconds: a smoke run on tiny sizes

Variants of the same trial (`train_and_evaluate`, the baseline model, `--epochs` epochs of the
default `min_epoch_samples`, early stopping off, 1 thread, synthetic data of the shape), each timed
against the baseline model ("off"):
- "summary": `summary_features` on, each data set's statistics computed once per trial and sliced
  per batch (what training does); "summary, per step": recomputed from every batch in the forward
  pass (what training did before, and still does where `augment_jitter`/`augment_scale` change the
  series every step);
- "step_conv": `step_conv` on, as the model runs it (matrix products over each window and patch);
  "step_conv, as convolutions": the same weights through `Conv1d` calls, what the model ran before;
- "off, as convolution": the baseline's patch map through its `Conv1d` call, as before.
The variants alternate within each round (the order rotates) and each ratio is the median of the
per-round paired ratios of seconds per trial against "off"; min..max is the noise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from cycle_optuna import train
from cycle_optuna.config import DataConfig, Hyperparams, TrainConfig
from cycle_optuna.data import load_task
from cycle_optuna.model import TransformerClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine  # noqa: E402

# (steps, channels, series): short, PLAID's length, Watch's length and channels
SHAPES = [(16, 8, 400), (1344, 1, 300), (2618, 6, 200)]
QUICK = [(16, 4, 60), (200, 2, 60)]


@contextlib.contextmanager
def _per_step_summaries():
    real = train.summaries
    train.summaries = lambda model, x: None  # the forward pass computes them from each batch
    try:
        yield
    finally:
        train.summaries = real


@contextlib.contextmanager
def _as_convolutions():
    """The model's patch map and step_conv through their Conv1d modules (channels first)."""
    real = TransformerClassifier._patches, TransformerClassifier._step_windows
    TransformerClassifier._patches = lambda self, h: self.embed(h.transpose(1, 2)).transpose(1, 2)
    TransformerClassifier._step_windows = lambda self, h: self.step_conv(h.transpose(1, 2)).transpose(1, 2)
    try:
        yield
    finally:
        TransformerClassifier._patches, TransformerClassifier._step_windows = real


def variants() -> dict[str, tuple[Hyperparams, object]]:
    base = Hyperparams()
    summary = dataclasses.replace(base, summary_features=True)
    step = dataclasses.replace(base, step_conv=True)
    return {"off": (base, contextlib.nullcontext), "summary": (summary, contextlib.nullcontext),
            "summary, per step": (summary, _per_step_summaries), "step_conv": (step, contextlib.nullcontext),
            "step_conv, as convolutions": (step, _as_convolutions), "off, as convolution": (base, _as_convolutions)}


def _trial(data, hp: Hyperparams, cfg: TrainConfig, how) -> float:
    with how():
        t0 = time.perf_counter()
        train.train_and_evaluate(data, hp, cfg, seed=0)
        return time.perf_counter() - t0


def bench(steps: int, channels: int, series: int, rounds: int, epochs: int) -> dict[str, list[float]]:
    data = load_task(DataConfig(seq_len=steps, n_features=channels, n_samples=series, folds=1), 0)
    cfg = TrainConfig(epochs=epochs, early_stopping_patience=0, device="cpu", threads=1)
    todo = variants()
    for hp, how in todo.values():  # warm-up
        _trial(data, hp, cfg, how)
    secs: dict[str, list[float]] = {v: [] for v in todo}
    order = list(todo)
    for r in range(rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            hp, how = todo[v]
            secs[v].append(_trial(data, hp, cfg, how))
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
    names = [v for v in variants() if v != "off"]
    print(_machine.describe())
    print(f"{epochs} epochs per trial, {rounds} rounds; seconds per trial against the baseline model (off), median (min..max)")
    print("| series (steps x channels) | off: s per trial | " + " | ".join(f"{v} / off" for v in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for steps, channels, series in QUICK if args.quick else SHAPES:
        secs = bench(steps, channels, series, rounds, epochs)
        ratio = {v: [a / b for a, b in zip(secs[v], secs["off"])] for v in names}
        cells = [f"{statistics.median(r):.2f}x ({min(r):.2f}..{max(r):.2f})" for r in ratio.values()]
        print(f"| {steps} x {channels} ({series} series) | {statistics.median(secs['off']):.2f} | " + " | ".join(cells) + " |",
              flush=True)
    print(f"ratio step_conv/off seconds per trial at the longest shape: {statistics.median(ratio['step_conv']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
