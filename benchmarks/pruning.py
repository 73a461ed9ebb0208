"""Pruning: the same study budget with no pruner, MedianPruner and HyperbandPruner, over several seeds.

    .venv/bin/python benchmarks/pruning.py             # 3 seeds x 3 pruners x 15 trials (~5 min, 2 cores)
    .venv/bin/python benchmarks/pruning.py --quick     # seconds: a smoke run on tiny sizes
    .venv/bin/python benchmarks/pruning.py --seeds 0 1 2 3 4 --trials 20

Each study is the project's own: cycle_optuna.objective.Objective on the project's loop, the study
file's sampler (worker.build_sampler, seeded by the study seed, baseline enqueued as trial 0 as
open_study does) and make_pruner, in memory. Only [pruner] changes between the three studies of a
seed; the seed also draws the data split. Budget: the same number of trials. Reported per study:
epochs trained (pruned trials count the epochs they ran), the best validation loss, and wall time.
The sizes are the seed study shrunk to run on two shared cores; they are printed with the results.
The last line: epochs run with pruning / without, and the best val loss change, per pruner.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import optuna
import torch
from optuna.trial import TrialState

from cycle_optuna import config as config_mod
from cycle_optuna import worker
from cycle_optuna.data import load_task
from cycle_optuna.objective import Objective, make_pruner

STUDY = {
    "study": {"name": "pruning-bench", "n_trials": 15},
    "data": {"source": "synthetic", "n_samples": 600, "seq_len": 16},
    "train": {"epochs": 10, "warmup_epochs": 1.0, "early_stopping_patience": 4, "device": "cpu", "threads": 1},
    "baseline": {"lr": 5e-4, "batch_size": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4, "dropout": 0.1},
    "space": {
        "lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "n_layers": {"low": 1, "high": 3},
        "hidden_dim": {"choices": [32, 64]},
        "n_heads": {"choices": [2, 4]},
        "batch_size": {"choices": [32, 64]},
        "dropout": {"low": 0.0, "high": 0.4},
    },
    "sampler": {"type": "tpe"},
}
PRUNERS = {
    "none": {"type": "none"},
    "median": {"type": "median", "n_startup_trials": 3, "n_warmup_steps": 2},
    "hyperband": {"type": "hyperband", "min_resource": 1, "reduction_factor": 3},
}


def run_study(raw: dict, seed: int, pruner: str) -> dict:
    raw = {**raw, "study": {**raw["study"], "seed": seed}, "pruner": PRUNERS[pruner]}
    cfg = config_mod.parse(raw, "<pruning benchmark>")
    data = load_task(cfg.data, seed)
    study = optuna.create_study(sampler=worker.build_sampler(cfg), pruner=make_pruner(cfg.pruner, cfg.train.epochs),
                                direction=cfg.study.direction)
    if cfg.sampler.type not in ("cycle", "reference"):
        study.enqueue_trial({p.name: getattr(cfg.baseline, p.name) for p in cfg.space})
    t0 = time.perf_counter()
    study.optimize(Objective(cfg, data), n_trials=cfg.study.n_trials)
    seconds = time.perf_counter() - t0
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return {
        "seed": seed, "pruner": pruner,
        "epochs": sum(t.user_attrs.get("epochs_run", 0) for t in trials),
        "complete": len(done),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "best": min(t.value for t in done) if done else float("nan"),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=None, help="trials per study (default 15, quick 6)")
    ap.add_argument("--epochs", type=int, default=None, help="max epochs per trial (default 10, quick 4)")
    ap.add_argument("--sampler", default="tpe", choices=["tpe", "random", "cycle"])
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    raw = {k: dict(v) for k, v in STUDY.items()}
    if args.quick:
        raw["data"].update(n_samples=150, seq_len=8)
        raw["space"]["n_layers"] = {"low": 1, "high": 2}
        raw["space"]["hidden_dim"] = {"choices": [16, 32]}
        raw["baseline"] = {**raw["baseline"], "hidden_dim": 32, "n_layers": 1}
    raw["study"]["n_trials"] = args.trials or (6 if args.quick else 15)
    raw["train"]["epochs"] = args.epochs or (4 if args.quick else 10)
    raw["sampler"] = {"type": args.sampler}
    d, t = raw["data"], raw["train"]
    print(f"sizes: {d['n_samples']} synthetic sequences x {d['seq_len']} steps x 8 features (70% train), "
          f"{raw['study']['n_trials']} trials per study, <= {t['epochs']} epochs per trial, early stopping "
          f"patience {t['early_stopping_patience']}, sampler {args.sampler}, 1 thread; seeds {args.seeds}\n")
    print("| seed | pruner | trials complete / pruned / failed | epochs run | best val loss | seconds |")
    print("|---:|---|---|---:|---:|---:|")
    rows = []
    for seed in args.seeds:
        for pruner in PRUNERS:
            r = run_study(raw, seed, pruner)
            rows.append(r)
            print(f"| {seed} | {pruner} | {r['complete']} / {r['pruned']} / {r['failed']} | {r['epochs']} "
                  f"| {r['best']:.4f} | {r['seconds']:.1f} |", flush=True)
    none = {r["seed"]: r for r in rows if r["pruner"] == "none"}
    print("\n| pruner | epochs (sum over seeds) | fewer epochs than none | best val loss vs none, per seed "
          "| median change |")
    print("|---|---:|---:|---|---:|")
    summary = []
    for pruner in PRUNERS:
        mine = [r for r in rows if r["pruner"] == pruner]
        epochs = sum(r["epochs"] for r in mine)
        saved = 1 - epochs / sum(r["epochs"] for r in none.values())
        changes = [100 * (r["best"] / none[r["seed"]]["best"] - 1) for r in mine]
        print(f"| {pruner} | {epochs} | {100 * saved:.0f}% | {', '.join(f'{c:+.2f}%' for c in changes)} "
              f"| {statistics.median(changes):+.2f}% |")
        if pruner != "none":
            summary.append(f"{pruner} {1 - saved:.2f}x epochs, "
                           f"best val loss {statistics.median(changes):+.2f}% (worst {max(changes):+.2f}%)")
    print("\nratio with/without pruning: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
