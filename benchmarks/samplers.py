"""CycleSampler vs TPE vs random vs CMA-ES on the built-in task, and ask time per trial.

    .venv/bin/python benchmarks/samplers.py            # full: 5 seeds, budgets 10/20/40 (~20 min on 2 cores)
    .venv/bin/python benchmarks/samplers.py --quick    # smoke test: 2 seeds, budgets 5/10, tiny task

Search: each (sampler, seed) runs one study of max(budget) trials in one process, with the study
file's pruner, cycle 1 = the baseline for every sampler (as `cycle-optuna run` does), and
the study seed seeding data split, model init and sampler. A budget of k trials is the first k
trials of that study. Per sampler and budget: median best val loss over seeds with its min-max,
and the median number of epochs trained (pruned trials count the epochs they ran). The task is
studies/seed.toml's, shrunk so 4 x 5 x 40 trials fit the time (sizes are printed).

Ask time: an in-memory study holding N fabricated finished trials of the seed space; the median
time of `study.ask(space)` (which samples every parameter) over 15 asks, per sampler.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import random
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import optuna

import _machine  # benchmarks/: the directory of this script
from cycle_optuna import config as config_mod
from cycle_optuna.config import ParamSpace, SamplerConfig, StudyConfig
from cycle_optuna.sampler import REASON_ATTR, CycleSampler, make_sampler
from cycle_optuna.space import distributions

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("cycle", "tpe", "random", "cmaes")

# The seed study's space without its slowest corner (hidden 256, 5-6 layers, batch 16), which
# costs 10-30x the baseline per trial on CPU; the baseline is the seed's.
FULL_TASK = dict(n_samples=480, seq_len=12, epochs=5)
QUICK_TASK = dict(n_samples=240, seq_len=8, epochs=3)
SPACE = (
    ParamSpace("lr", low=1e-4, high=1e-2, log=True),
    ParamSpace("n_layers", low=1, high=4),
    ParamSpace("hidden_dim", choices=(16, 32, 64, 128)),
    ParamSpace("n_heads", choices=(2, 4, 8)),
    ParamSpace("batch_size", choices=(32, 64, 128)),
    ParamSpace("dropout", low=0.0, high=0.5),
)


def task_config(size: dict[str, int], seed: int) -> StudyConfig:
    cfg = config_mod.load(ROOT / "studies" / "seed.toml")
    return dataclasses.replace(
        cfg,
        study=dataclasses.replace(cfg.study, seed=seed),
        data=dataclasses.replace(cfg.data, n_samples=size["n_samples"], seq_len=size["seq_len"]),
        train=dataclasses.replace(
            cfg.train, epochs=size["epochs"], early_stopping_patience=3, threads=1, device="cpu"
        ),
        space=SPACE,
    )


def run_search(kind: str, seed: int, n_trials: int, size: dict[str, int]) -> dict[str, Any]:
    """One study; per trial its state, value and epochs."""
    import torch

    from cycle_optuna.data import load_task
    from cycle_optuna.objective import Objective, make_pruner

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    cfg = task_config(size, seed)
    baseline = {p.name: getattr(cfg.baseline, p.name) for p in cfg.space}
    sampler = make_sampler(dataclasses.replace(cfg.sampler, type=kind), baseline=baseline, seed=seed)
    study = optuna.create_study(sampler=sampler, pruner=make_pruner(cfg.pruner, cfg.train.epochs))
    if kind not in ("cycle", "reference"):
        study.enqueue_trial(baseline)
    objective = Objective(cfg, load_task(cfg.data, seed))
    started = time.perf_counter()
    study.optimize(objective, n_trials=n_trials, catch=(Exception,))
    trials = [
        {
            "state": t.state.name,
            "value": t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
            "epochs": t.user_attrs.get("epochs_run", len(t.intermediate_values)),
            "params": t.params,
            "reason": t.user_attrs.get(REASON_ATTR),  # the CycleSampler's "why this cycle"
        }
        for t in study.trials
    ]
    return {"sampler": kind, "seed": seed, "trials": trials, "seconds": time.perf_counter() - started}


def best_within(trials: list[dict[str, Any]], budget: int) -> float:
    values = [t["value"] for t in trials[:budget] if t["value"] is not None]
    return min(values) if values else float("nan")


def summarise(runs: list[dict[str, Any]], samplers: tuple[str, ...], budgets: list[int], seeds: list[int]) -> str:
    by = {(r["sampler"], r["seed"]): r["trials"] for r in runs}
    lines = [
        "| sampler | trials | best val loss, median | min - max | epochs, median |",
        "|---|---:|---:|---:|---:|",
    ]
    med: dict[tuple[str, int], float] = {}
    for kind in samplers:
        for b in budgets:
            bests = [best_within(by[kind, s], b) for s in seeds]
            epochs = [sum(t["epochs"] for t in by[kind, s][:b]) for s in seeds]
            med[kind, b] = statistics.median(bests)
            lines.append(
                f"| {kind} | {b} | {med[kind, b]:.4f} | {min(bests):.4f} - {max(bests):.4f} | {statistics.median(epochs):.0f} |"
            )
    out = ["\n".join(lines), ""]
    if "cycle" in samplers and "tpe" in samplers:
        for b in budgets:
            wins = sum(best_within(by["cycle", s], b) < best_within(by["tpe", s], b) for s in seeds)
            out.append(f"cycle beats tpe at {b} trials in {wins} of {len(seeds)} seeds")
        lo, hi = budgets[len(budgets) // 2], budgets[-1]
        out.append(
            f"cycle at {lo} trials: median {med['cycle', lo]:.4f}; tpe at {hi} trials: median {med['tpe', hi]:.4f} "
            f"({'reached' if med['cycle', lo] <= med['tpe', hi] else 'not reached'})"
        )
    return "\n".join(out)


def ask_time(n_trials: int, kind: str, repeats: int = 25) -> dict[str, float]:
    """Ask times in ms with n_trials finished trials in memory: the first ask (the cycle sampler
    builds its cache), then the median over the following asks, split for the cycle sampler into
    local moves and exploration trials (which are TPE's work), and the mean over all of them."""
    space = distributions(task_config(FULL_TASK, 0))
    rng = random.Random(0)

    def fabricated() -> optuna.trial.FrozenTrial:
        params = {
            name: (rng.choice(d.choices) if hasattr(d, "choices") else
                   rng.randint(d.low, d.high) if isinstance(d, optuna.distributions.IntDistribution) else
                   10 ** rng.uniform(-4, -2) if d.log else rng.uniform(d.low, d.high))
            for name, d in space.items()
        }
        return optuna.trial.create_trial(params=params, distributions=space, value=rng.uniform(0.9, 1.1))

    baseline = {"lr": 5e-4, "n_layers": 2, "hidden_dim": 64, "n_heads": 4, "batch_size": 32, "dropout": 0.1}
    sampler = CycleSampler(baseline=baseline, seed=0) if kind == "cycle" else optuna.samplers.TPESampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    study.add_trials([fabricated() for _ in range(n_trials)])
    times: list[tuple[float, bool]] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trial = study.ask(space)
        times.append(((time.perf_counter() - t0) * 1e3, str(trial.user_attrs.get("cycle_move", "")).startswith("explore")))
        study.tell(trial, rng.uniform(0.9, 1.1))
    rest = times[1:]
    local = [t for t, explore in rest if not explore]
    explore = [t for t, explore in rest if explore]
    return {
        "first": times[0][0],
        "median": statistics.median(t for t, _ in rest),
        "local": statistics.median(local) if local else float("nan"),
        "explore": statistics.median(explore) if explore else float("nan"),
        "explore_share": len(explore) / len(rest),
        "mean": statistics.fmean(t for t, _ in rest),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 seeds, budgets 5/10, a tiny task")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; 2 with --quick)")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=[*SAMPLERS, "reference"])
    p.add_argument("--jobs", type=int, default=2, help="studies run in parallel, one CPU thread each")
    p.add_argument("--ask-sizes", type=int, nargs="*", default=None, help="default 1000 10000 (1000 with --quick)")
    p.add_argument("--only", choices=("search", "ask"), default=None, help="run one part only")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="default 10 20 40 (5 10 with --quick)")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")

    size = QUICK_TASK if args.quick else FULL_TASK
    budgets = args.budgets or ([5, 10] if args.quick else [10, 20, 40])
    seeds = list(range(args.seeds or (2 if args.quick else 5)))
    samplers = tuple(args.samplers)
    ask_sizes = args.ask_sizes if args.ask_sizes is not None else ([1000] if args.quick else [1000, 10000])
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(_machine.describe())
    print(
        f"task: studies/seed.toml's synthetic task shrunk to n_samples={size['n_samples']}, "
        f"seq_len={size['seq_len']}, epochs={size['epochs']} (early stopping 3), CPU, 1 thread per study; "
        f"space: " + ", ".join(f"{s.name} {list(s.choices) if s.choices else [s.low, s.high]}" for s in SPACE)
        + f"; the study file's pruner ({config_mod.load(ROOT / 'studies' / 'seed.toml').pruner.type}); seeds {seeds}; budgets {budgets}",
        flush=True,
    )

    runs: list[dict[str, Any]] = []
    if args.only != "ask":
        runs = search(samplers, seeds, budgets, size, args.jobs)
    ask: dict[str, dict[str, float]] = {}
    if args.only != "search":
        ask = ask_times(ask_sizes)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "ask_ms": ask, "task": size, "budgets": budgets}, indent=1))
    return 0


def search(samplers: tuple[str, ...], seeds: list[int], budgets: list[int], size: dict[str, int], n_jobs: int) -> list:
    started = time.perf_counter()
    jobs = [(kind, seed) for seed in seeds for kind in samplers]
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(run_search, kind, seed, max(budgets), size) for kind, seed in jobs]
        runs = []
        for f in futures:
            runs.append(f.result())
            r = runs[-1]
            print(f"  {r['sampler']:>6} seed {r['seed']}: best {best_within(r['trials'], max(budgets)):.4f} "
                  f"in {r['seconds']:.0f}s", flush=True)
    print(f"\nsearch ({time.perf_counter() - started:.0f}s):\n")
    print(summarise(runs, samplers, budgets, seeds))
    return runs


def ask_times(ask_sizes: list[int]) -> dict[str, dict[str, float]]:
    print("\nask time per trial, ms (in-memory study of N finished trials, fabricated; 24 asks after a first one):\n")
    print("| N trials | sampler | first ask | median | local moves, median | exploration asks, median (share) | mean |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    ask = {}
    for n in ask_sizes:
        for kind in ("cycle", "tpe"):
            a = ask[f"{kind}-{n}"] = ask_time(n, kind)
            if kind == "cycle":
                row = (f"{a['local']:.2f} | {a['explore']:.1f} ({a['explore_share']:.0%})")
            else:
                row = "- | -"
            print(f"| {n} | {kind} | {a['first']:.1f} | {a['median']:.2f} | {row} | {a['mean']:.1f} |", flush=True)
    return ask


if __name__ == "__main__":
    sys.exit(main())
