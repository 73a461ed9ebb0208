"""Accuracy of a default study against the study's reference baselines and a published figure.

    .venv/bin/python benchmarks/accuracy.py --data-dir DIR             # built-in task + 4 UCR sets, 20 trials each
    .venv/bin/python benchmarks/accuracy.py --datasets GunPoint --trials 5 --epochs 8
    .venv/bin/python benchmarks/accuracy.py --datasets OSULeaf --seed 1       # another [study] seed of the UCR studies
    .venv/bin/python benchmarks/accuracy.py --tiny                     # seconds: a smoke run
    .venv/bin/python benchmarks/accuracy.py --datasets ACSF1 --keep runs/  # keep the study files and databases
    .venv/bin/python benchmarks/accuracy.py --datasets OSULeaf --refit   # also the best model refit on all training series

Per dataset it runs one study with the cycle sampler and prints the held-out test accuracy of the
best model (the `[study] ensemble` best cycles by validation loss, their class probabilities
averaged; never chosen on test) and of the best cycle alone, each reference baseline's test
accuracy on the same split (the study's `cycle_optuna_baselines`), and the published ROCKET
accuracy with its source. The built-in task runs studies/seed.toml as shipped. A UCR/UEA set runs the default study
for a data file below: [baseline] and [train] are the project's defaults, with patch_len set to the
automatic choice for the series length and the [space] around it; the official TRAIN file is
`source` (validation is carved from it, or, under the default [data] folds = "auto", 5-fold
cross-validation runs over it when that split would hold at most 20 series) and the TEST file
is `test_source`.

UCR sets are read from DIR/<Name>/<Name>_TRAIN.ts and _TEST.ts (the layout of the UCR archive and
of the aeon wheel's datasets/data folder, whose variants such as PickupGestureWiimoteZ_eq sit in
their set's folder, where they are found too; .arff, .tsv or .txt files when there is no .ts pair); DIR comes from --data-dir or $CYCLE_OPTUNA_UCR_DIR, and a
set whose files are absent is skipped with a message.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np
import optuna
import torch

from cycle_optuna import api, config, storage, worker
from cycle_optuna.data import load_study_data
from cycle_optuna.model import auto_patch_len
from cycle_optuna.refitting import refit as refit_model

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "CYCLE_OPTUNA_UCR_DIR"
UCR_SETS = ("GunPoint", "OSULeaf", "ACSF1", "PickupGestureWiimoteZ")
# ROCKET (Dempster, Petitjean, Webb 2020, "ROCKET: exceptionally fast and accurate time series
# classification using random convolutional kernels", Data Mining and Knowledge Discovery 34):
# mean test accuracy on the official train/test split, from the authors' results/results_ucr.csv
# (github.com/angus924/rocket).
ROCKET_SOURCE = "ROCKET (Dempster et al. 2020), angus924/rocket results_ucr.csv"
ROCKET = {"GunPoint": 1.000, "OSULeaf": 0.941, "ACSF1": 0.886, "PickupGestureWiimoteZ": 0.830}
BAYES_SOURCE = "exact Bayes rate of the task (docs/task.md)"

# The default study for a data file: the project's [baseline] and [train] defaults, a [space] over
# optimisation, capacity, resolution and the model's knobs. {patch} is the automatic patch length.
FILE_STUDY = """
[study]
name = "{name}"
n_trials = {trials}
seed = {seed}

[data]
source = "{train}"
test_source = "{test}"

[train]
epochs = {epochs}

[baseline]
patch_len = {patch}

[space]  # what a file without [space] searches: patch_len around the automatic one, then config.DEFAULT_SPACE
patch_len = {{ choices = {patches} }}
{default_space}

[sampler]
type = "cycle"
"""

TINY_STUDY = """
[study]
name = "tiny"
n_trials = {trials}
seed = {seed}

[data]
source = "{train}"
test_source = "{test}"

[train]
epochs = {epochs}
min_epoch_samples = 64

[baseline]
hidden_dim = 16
n_layers = 1
patch_len = {patch}

[space]
lr = {{ low = 1e-4, high = 1e-2, log = true }}
patch_len = {{ choices = {patches} }}

[sampler]
type = "cycle"
"""


def write_tiny_ts(folder: Path) -> Path:
    """A generated two-class univariate .ts set (a bump early vs late), TRAIN and TEST files."""
    rng = np.random.default_rng(0)
    for split, n in (("TRAIN", 40), ("TEST", 30)):
        lines = ["@problemName Tiny", "@timeStamps false", "@missing false", "@univariate true",
                 "@equalLength true", "@seriesLength 24", "@classLabel true a b", "@data"]
        for i in range(n):
            x = rng.normal(0, 0.3, 24)
            x[4 + 12 * (i % 2):8 + 12 * (i % 2)] += 2.0
            lines.append(",".join(f"{v:.4f}" for v in x) + ":" + "ab"[i % 2])
        (folder / "Tiny").mkdir(parents=True, exist_ok=True)
        (folder / "Tiny" / f"Tiny_{split}.ts").write_text("\n".join(lines) + "\n")
    return folder


ARCHIVE_SUFFIXES = (".ts", ".arff", ".tsv", ".txt")  # the archive's formats, in the order they are looked for


def archive_files(data_dir: Path, name: str) -> tuple[Path, Path] | tuple[None, None]:
    """DIR/<Name>/<Name>_TRAIN and _TEST of the first archive format that has both; a variant that
    shares its set's folder (the aeon wheel's PickupGestureWiimoteZ/PickupGestureWiimoteZ_eq_TRAIN.ts)
    is looked for in DIR/<Base>/ for each <Base>_ that <Name> starts with."""
    parts = name.split("_")
    folders = [name, *("_".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))]
    for folder in folders:
        for suffix in ARCHIVE_SUFFIXES:
            train, test = (data_dir / folder / f"{name}_{split}{suffix}" for split in ("TRAIN", "TEST"))
            if train.is_file() and test.is_file():
                return train, test
    return None, None


def _series_len(train: Path, test: Path) -> int:
    """Longest series of a train/test pair (the data module pads shorter ones to it), loaded as the
    study loads them: the TRAIN file alone may be too small to split off a test part of its own."""
    from cycle_optuna.data import load_task

    cfg = config.DataConfig(source=str(train), test_source=str(test))
    return load_task(cfg, 0, data_path=train, test_path=test).seq_len


def file_study(name: str, train: Path, test: Path, *, trials: int, epochs: int, template: str, where: Path,
               seed: int = 0) -> Path:
    """Write the default study file for a train/test pair; patch lengths around the automatic one."""
    p = auto_patch_len(_series_len(train, test))
    patches = sorted({max(1, p // 2), p, 2 * p})
    path = where / f"{name}.toml"
    path.write_text(template.format(name=name, trials=trials, epochs=epochs, seed=seed, train=train.resolve(),
                                    test=test.resolve(), patch=p, patches=patches, default_space=_toml_space()))
    return path


def _toml_space() -> str:
    """config.DEFAULT_SPACE as [space] lines."""
    def value(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return f"[{', '.join(value(x) for x in v)}]"
        return f'"{v}"' if isinstance(v, str) else str(v)

    return "\n".join(f"{name} = {{ {', '.join(f'{k} = {value(v)}' for k, v in spec.items())} }}"
                     for name, spec in config.DEFAULT_SPACE.items())


def _one_nn(cfg: config.StudyConfig) -> dict[str, dict]:
    """1-NN (Euclidean, normalised series, padding as zeros) when the study stored no baselines."""
    data = load_study_data(cfg)
    train = torch.nan_to_num(data.x_train).flatten(1)
    test = torch.nan_to_num(data.x_test).flatten(1)
    pred = data.y_train[torch.cdist(test, train).argmin(dim=1)]
    return {"1nn": {"label": "1-NN Euclidean", "test_accuracy": float((pred == data.y_test).float().mean())}}


def run_study(study_file: Path, *, refit: bool = False) -> dict:
    """Run a study file to its n_trials in a fresh SQLite file; the best trial's test accuracy and the
    baselines; with `refit`, also the test accuracy of the best model refit on all training series."""
    cfg = config.load(study_file)
    url = storage.default_url(cfg)  # a fresh local file where `cycle-optuna best FILE` looks (never $CYCLE_OPTUNA_STORAGE)
    t0 = time.perf_counter()
    study = worker.run_worker(cfg, url)
    seconds = time.perf_counter() - t0
    score = api.held_out_score(study)  # the best model: the `[study] ensemble` best cycles averaged
    single = api.held_out_score(study, model=api.load_best_model(study, ensemble=1))
    refs = study.user_attrs.get("cycle_optuna_baselines") or _one_nn(cfg)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    out = {"test": score.accuracy, "cycle": score.cycle, "cycles": score.cycles, "single": single.accuracy, "n": score.n, "trials": len(study.trials),
           "complete": len(done), "baselines": refs, "seconds": seconds,
           "best_params": {k: v for k, v in api.best_params(study).items()}}
    if refit:
        t0 = time.perf_counter()
        out["refit"] = api.held_out_score(study, model=refit_model(study)).accuracy
        out["refit_seconds"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["builtin", *UCR_SETS],
                    help="'builtin' (studies/seed.toml) and UCR/UEA set names")
    ap.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV),
                    help=f"folder holding <Name>/<Name>_TRAIN and _TEST .ts (or .arff, .tsv, .txt) files (default ${DATA_DIR_ENV})")
    ap.add_argument("--trials", type=int, default=20, help="trials per UCR study (the built-in study keeps its own)")
    ap.add_argument("--epochs", type=int, default=config.TrainConfig().epochs, help="epochs per trial (UCR studies)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0, help="[study] seed of the UCR studies (the built-in study keeps its own)")
    ap.add_argument("--tiny", action="store_true", help="a generated tiny .ts set, 2 trials: a smoke run")
    ap.add_argument("--refit", action="store_true",
                    help="also score the best model refit on all training series (`cycle-optuna refit`)")
    ap.add_argument("--keep", type=Path, default=None, metavar="DIR",
                    help="write each study file and its SQLite database here (kept) instead of a temporary folder; "
                         "open them with `cycle-optuna report DIR/NAME.toml`")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ[worker.THREADS_ENV_VAR] = str(args.threads)
    rows = []
    if args.keep is not None:
        taken = sorted(args.keep.glob("*.db")) if args.keep.is_dir() else []
        if taken:
            print(f"--keep {args.keep}: {taken[0].name} exists there; choose a folder without study databases",
                  file=sys.stderr)
            return 2
        args.keep.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(args.keep)) if args.keep is not None else tempfile.TemporaryDirectory()) as tmp:
        work = Path(tmp)
        if args.tiny:
            data_dir, names, template = write_tiny_ts(work / "data"), ["Tiny"], TINY_STUDY
            args.trials, args.epochs = min(args.trials, 2), min(args.epochs, 2)
        else:
            data_dir, names, template = Path(args.data_dir) if args.data_dir else None, args.datasets, FILE_STUDY
        print(f"torch {torch.__version__}, {args.threads} thread(s); UCR studies: seed {args.seed}, {args.trials} trials of "
              f"{args.epochs} epochs; data dir: {data_dir or 'none'}", flush=True)
        for name in names:
            if name == "builtin":
                raw = tomllib.loads((ROOT / "studies" / "seed.toml").read_text())
                study_file = work / "seed.toml"
                study_file.write_text((ROOT / "studies" / "seed.toml").read_text())
                res = run_study(study_file, refit=args.refit)
                rows.append(("built-in (seed.toml)", res, None, BAYES_SOURCE, raw["study"]["n_trials"]))
            else:
                train, test = archive_files(data_dir, name) if data_dir else (None, None)
                if train is None:
                    print(f"skipped {name}: no {name}_TRAIN/_TEST file ({', '.join(ARCHIVE_SUFFIXES)}) under "
                          f"{data_dir or f'--data-dir / ${DATA_DIR_ENV}'}")
                    continue
                res = run_study(file_study(name, train, test, trials=args.trials, epochs=args.epochs,
                                           template=template, where=work, seed=args.seed), refit=args.refit)
                rows.append((name, res, ROCKET.get(name), ROCKET_SOURCE if name in ROCKET else "-", args.trials))
            r = rows[-1][1]
            print(f"done {rows[-1][0]}: test {r['test']:.3f} (cycles {', '.join(map(str, r['cycles']))}; "
                  f"best cycle {r['cycle']} alone {r['single']:.3f}), {r['seconds']:.0f} s, "
                  + (f"refit {r['refit']:.3f} ({r['refit_seconds']:.0f} s), " if "refit" in r else "") +
                  f"best params {r['best_params']}", flush=True)
    if not rows:
        return 0
    keys = list(dict.fromkeys(k for _, r, *_ in rows for k in r["baselines"]))
    labels = {k: next(r["baselines"][k]["label"] for _, r, *_ in rows if k in r["baselines"]) for k in keys}
    refit = " refit on all training series |" if args.refit else ""
    print("\n| dataset | trials | tuned transformer (test) |" + refit + " best cycle alone | "
          + " | ".join(labels[k] for k in keys) + " | published | source |")
    print("|---|---:|---:|" + "---:|" * bool(refit) + "---:|" + "---:|" * len(keys) + "---:|---|")
    for name, r, published, source, trials in rows:
        refs = [r["baselines"].get(k, {}).get("test_accuracy") for k in keys]
        cells = " | ".join("-" if v is None else f"{v:.3f}" for v in refs)
        pub = "-" if published is None else f"{published:.3f}"
        if name.startswith("built-in"):
            pub = "0.964"
        refit_cell = f" {r['refit']:.3f} |" if "refit" in r else ""
        print(f"| {name} | {trials} | {r['test']:.3f} |{refit_cell} {r['single']:.3f} | {cells} | {pub} | {source} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
