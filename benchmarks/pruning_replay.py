"""Choose ParentCurvePruner settings offline: record unpruned curves once, replay pruners on them.

    .venv/bin/python benchmarks/pruning_replay.py --curves curves.json --seeds 10 11 12 13 14 15   # record + sweep
    .venv/bin/python benchmarks/pruning_replay.py --curves curves.json --seeds 16 17 --no-sweep --parent 0.25 0.1 0.2 1

pruning.py's design (one fixed sequence of 16 configurations per seed, <= 16 epochs, same data and
training seed) makes a pruned study's surviving trials end with exactly their unpruned values, and a
pruned trial's curve up to its pruning equal to its unpruned curve. So a pruner can be judged
without training: record every trial's per-epoch validation loss once with no pruning (about 2.5
minutes a seed here; seeds already in --curves are not recorded again), then replay each seed's
trials through the real pruner (pruning.py's median, hyperband and parent, and ParentCurvePruner
settings of a grid) in an in-memory study (ask, report the recorded values
epoch by epoch, stop where it says prune). A replay takes milliseconds, so a grid of settings can
be swept on development seeds, and the chosen one then run for real on the reported seeds by
pruning.py. Printed per setting: epochs saved against no pruning and the seeds whose best val loss
stays within 1% of the unpruned best, best settings first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Callable

import optuna
import torch
from optuna.trial import TrialState

import pruning
from cycle_optuna import config as config_mod
from cycle_optuna.objective import make_pruner

GRID = {  # warmup_fraction, margin, early_margin, patience
    "warmup_fraction": (0.125, 0.2, 0.25),
    "margin": (0.0, 0.05, 0.1, 0.15),
    "early_margin": (0.0, 0.1, 0.2, 0.4),
    "patience": (1, 2, 3),
}


def record(seed: int) -> list[dict]:
    """Every trial of the seed's sequence trained without pruning: state, value, epochs, curve."""
    raw = {k: dict(v) for k, v in pruning.STUDY.items()}
    raw["study"] = {**raw["study"], "seed": seed}
    sequence = pruning.draw_configurations(config_mod.parse(raw, "<replay>"), seed, raw["study"]["n_trials"])
    return pruning.run_study(raw, seed, "none", pruning.PRUNERS["none"], sequence)["trials"]


def replay(trials: list[dict], pruner: optuna.pruners.BasePruner, seed: int) -> tuple[int, float]:
    """Epochs run and best value when `pruner` judges the recorded trials in order."""
    # pruning.py's study name: HyperbandPruner picks brackets by a hash of study name and trial number
    study = optuna.create_study(study_name=f"{pruning.STUDY['study']['name']}-seed{seed}", pruner=pruner)
    epochs, best = 0, math.inf
    last = pruning.STUDY["train"]["epochs"] - 1  # the objective never prunes after the last epoch
    for t in trials:
        trial = study.ask()
        stopped = None
        for step, v in enumerate(t["curve"]):
            trial.report(v, step)
            if t["state"] == "COMPLETE" and step < last and trial.should_prune():
                stopped = step
                break
        if t["state"] != "COMPLETE":  # diverged without pruning too: same epochs either way
            study.tell(trial, state=TrialState.PRUNED)
            epochs += t["epochs"]
        elif stopped is not None:
            study.tell(trial, state=TrialState.PRUNED)
            epochs += stopped + 1
        else:
            study.tell(trial, t["value"])
            epochs += t["epochs"]
            best = min(best, t["value"])
    return epochs, best


def pruner_from(settings: dict) -> Callable[[], optuna.pruners.BasePruner]:
    """A [pruner] section (pruning.py's PRUNERS) -> a factory of fresh pruners, built as pruning.py builds them."""
    cfg = config_mod.parse({**pruning.STUDY, "pruner": settings}, "<replay>")
    return lambda: make_pruner(cfg.pruner, cfg.train.epochs)


def judge(curves: dict[int, list[dict]], make: Callable[[], optuna.pruners.BasePruner]) -> tuple[float, int, list[float]]:
    """Share of epochs saved (all seeds) and seeds within 1%, for one pruner."""
    run = unpruned = 0
    changes = []
    for seed, trials in curves.items():
        e, best = replay(trials, make(), seed)
        run += e
        unpruned += sum(t["epochs"] for t in trials)
        changes.append(best / min(t["value"] for t in trials if t["state"] == "COMPLETE") - 1)
    return 1 - run / unpruned, sum(c <= pruning.TARGET_LOSS for c in changes), changes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--curves", type=Path, required=True, help="JSON file of recorded curves (read, and extended)")
    ap.add_argument("--seeds", nargs="+", type=int, required=True, help="development seeds: never the reported 0-5")
    ap.add_argument("--parent", nargs=4, type=float, action="append",
                    metavar=("WARMUP_FRACTION", "MARGIN", "EARLY_MARGIN", "PATIENCE"), help="settings to show per seed")
    ap.add_argument("--no-sweep", action="store_true", help="only the --parent settings, not the grid")
    ap.add_argument("--top", type=int, default=15, help="settings shown from the sweep")
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    stored = json.loads(args.curves.read_text()) if args.curves.exists() else {}
    for seed in args.seeds:
        if str(seed) not in stored:
            print(f"recording seed {seed} (16 trials, no pruning) ...", flush=True)
            stored[str(seed)] = record(seed)
            args.curves.write_text(json.dumps(stored))
    curves = {seed: stored[str(seed)] for seed in args.seeds}
    n = len(curves)
    parent = pruning.PRUNERS["parent"]
    shown = [(f"{name} (pruning.py's)", pruner_from(pruning.PRUNERS[name])) for name in pruning.PRUNERS if name != "none"]
    shown += [(f"parent {w:g} {m:g} {em:g} {int(p)}",
               pruner_from({**parent, "warmup_fraction": w, "margin": m, "early_margin": em, "patience": int(p)}))
              for w, m, em, p in args.parent or []]
    for label, make in shown:
        saved, within, changes = judge(curves, make)
        print(f"{label}: {100 * saved:.0f}% fewer epochs, best within 1% on {within}/{n} seeds; "
              f"per seed {', '.join(f'{100 * c:+.2f}%' for c in changes)}")
    if args.no_sweep:
        return 0
    rows = []
    for values in itertools.product(*GRID.values()):
        settings = dict(zip(GRID, values))
        saved, within, _ = judge(curves, pruner_from({**parent, **settings}))
        rows.append((within, saved, settings))
    need = math.ceil(pruning.TARGET_SEEDS * n - 1e-9)
    for title, chosen in (
        ("most seeds within 1% first, then most saved", sorted(rows, key=lambda r: (-r[0], -r[1]))),
        (f"within 1% on >= {need}/{n} seeds (the target's share), most saved first",
         sorted((r for r in rows if r[0] >= need), key=lambda r: (-r[1], -r[0]))),
    ):
        print(f"\nsweep over {len(rows)} settings on seeds {args.seeds}, {title}:")
        print("| warmup_fraction | margin | early_margin | patience | saved vs none | best within 1% |")
        print("|---:|---:|---:|---:|---:|---:|")
        for within, saved, s in chosen[: args.top]:
            print(f"| {s['warmup_fraction']:g} | {s['margin']:g} | {s['early_margin']:g} | {s['patience']} "
                  f"| {100 * saved:.0f}% | {within}/{n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
