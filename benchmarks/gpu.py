"""One GPU, many trials: samples/s and trials/hour of plain, multi-worker, CUDA-graph and packed training.

    .venv/bin/python benchmarks/gpu.py                  # on a CUDA machine: everything (~15-30 min)
    .venv/bin/python benchmarks/gpu.py --skip-study     # the bare model only (minutes)
    .venv/bin/python benchmarks/gpu.py --quick          # seconds: a smoke run of every code path

Two parts, each against a baseline measured in the same run:

1. The bare seed model (hidden 64, 2 layers, 4 heads, batch 32, the seed task): training samples
   per second of one trial (`train_and_evaluate`, eager), the same trial with `compile =
   "cudagraphs"` (first call, compilation included, reported apart), and packed populations of M
   trials (`pack.train_pack`, M = 8 and 32; samples counted over all members). Ratios are against
   the eager trial.
2. The seed study (`studies/seed.toml`, 40 trials, its CycleSampler and pruner) run to the end with
   each setting: one plain worker; K workers on the GPU (`run --workers-per-gpu K`, K = 8 and 16);
   `[train] pack = 8` and 32; the most workers with the smallest pack each; CUDA graphs.
   Trials/hour (start-up included) against the plain worker, and each setting's best value, which
   should agree within noise. `--settings` picks among them (`--trials 20` halves the time).

Without a CUDA device the script says so and runs the same code paths on the CPU on small sizes,
so what it prints there checks the plumbing, not the GPU figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import torch

from cycle_optuna import config, pack, placement, storage, train, worker
from cycle_optuna.config import DataConfig, Hyperparams, TrainConfig
from cycle_optuna.data import load_task

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bare_model(args, device: str) -> list[tuple[str, float, str]]:
    """(variant, samples/s, note) for the seed model on the seed task."""
    hp = Hyperparams()
    dcfg = DataConfig(n_samples=200, seq_len=16) if args.quick else DataConfig()
    data = load_task(dcfg, 0)
    cfg = TrainConfig(epochs=args.epochs, early_stopping_patience=0, device=device, threads=args.threads)
    n = len(data.x_train) * cfg.epochs
    rows = []
    min_steps = train.CUDAGRAPH_MIN_STEPS

    def eager() -> None:
        train.train_and_evaluate(data, hp, cfg, seed=0)

    eager()  # warm-up: allocator, kernels, lazy imports
    eager_rate = statistics.median(n / _timed(eager, device) for _ in range(args.rounds))
    rows.append(("one trial, eager", eager_rate, "baseline"))
    if device == "cuda":
        # the replays' own speed: compiled however short the call (the product waits for a shape to
        # reach train.CUDAGRAPH_MIN_STEPS in a worker, which the seed-study setting below shows)
        train.CUDAGRAPH_MIN_STEPS = 0
        try:
            gcfg = dataclasses.replace(cfg, compile=config.COMPILE_CUDAGRAPHS)
            first = _timed(lambda: train.train_and_evaluate(data, hp, gcfg, seed=0), device)
            rate = statistics.median(n / _timed(lambda: train.train_and_evaluate(data, hp, gcfg, seed=0), device)
                                     for _ in range(args.rounds))
        finally:
            train.CUDAGRAPH_MIN_STEPS = min_steps
        rows.append(("one trial, CUDA graphs", rate, f"first call {first:.1f} s (compiling)"))
    else:
        rows.append(("one trial, CUDA graphs", float("nan"), "needs CUDA (trains eagerly on the CPU)"))
    for m in args.packs:
        # one incumbent's lr moves: every member shares the shape
        hps = [dataclasses.replace(hp, lr=hp.lr * 2 ** ((i % 5) - 2), dropout=0.05 + 0.05 * (i % 4))
               for i in range(m)]
        pack.train_pack(data, hps[:2], dataclasses.replace(cfg, epochs=1), seed=0)  # warm-up
        rate = statistics.median(m * n / _timed(lambda: pack.train_pack(data, hps, cfg, seed=0), device)
                                 for _ in range(args.rounds))
        rows.append((f"packed, M = {m}", rate, "all members together"))
    return rows


def _study_file(directory: Path, name: str, args, **train: object) -> Path:
    """studies/seed.toml under another name, with `train` keys replaced and the trial count set."""
    text = (ROOT / "studies" / "seed.toml").read_text()
    text = text.replace('name = "seed"', f'name = "{name}"')
    text = text.replace("n_trials = 10 ", f"n_trials = {args.trials} ")
    extra = "".join(f"{k} = {v!r}\n".replace("'", '"').replace("True", "true") for k, v in train.items())
    if args.quick:
        extra += "epochs = 1\n"
        text = text.replace("epochs = 12\n", "")
        text = text.replace('source = "synthetic"', 'source = "synthetic"\nn_samples = 200')
    path = directory / f"{name}.toml"
    path.write_text(text.replace("[train]\n", "[train]\n" + extra, 1))
    return path


def seed_study(args, device: str) -> list[tuple[str, float, float | None]]:
    """(setting, trials/hour, best value) for the seed study run to the end with each setting."""
    settings: list[tuple[str, dict, int]] = [("one plain worker", {}, 1)]
    where = " on one GPU" if device == "cuda" else ""
    if "workers" in args.settings:
        settings += [(f"{k} workers{where}", {}, k) for k in args.workers if k > 1]
    if "pack" in args.settings:
        settings += [(f"pack = {m}", {"pack": m}, 1) for m in args.packs]
    if "both" in args.settings and max(args.workers) > 1:  # the most workers, each packing the fewest
        k, m = max(args.workers), min(args.packs)
        settings.append((f"{k} workers{where}, pack = {m} each", {"pack": m}, k))
    if device == "cuda" and "graphs" in args.settings:
        settings.append(("CUDA graphs", {"compile": config.COMPILE_CUDAGRAPHS}, 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, train_keys, k) in enumerate(settings):
            if train_keys.get("compile"):  # pays its own compilation: nothing from the bare model's run
                import torch._dynamo

                torch._dynamo.reset()
                train._SHAPE_STEPS.clear()
            extra = {"threads": args.threads} if args.threads else {}
            path = _study_file(Path(tmp), f"gpu-bench-{i}", args, device=device, **extra, **train_keys)
            cfg = config.load(path)
            url = storage.resolve_url(cfg)
            t0, t_start = time.perf_counter(), datetime.datetime.now()
            if k == 1:
                study = worker.run_worker(cfg, url)
            else:
                study = worker.open_study(cfg, url)
                gpus = placement.plan(k, available=placement.visible_gpus()[:1]) if device == "cuda" else None
                procs = worker.start_local_workers(str(path), url, k, n_trials=None,
                                                   log_prefix=str(Path(tmp) / f"w{i}"), gpus=gpus)
                for p, log in procs:
                    if p.wait() != 0:
                        tail = Path(log).read_text(errors="replace").splitlines()[-5:] if Path(log).exists() else []
                        print(f"  worker exited {p.returncode}; its log ends:", *tail, sep="\n    ", flush=True)
            seconds = time.perf_counter() - t0
            done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
            best = study.best_value if any(t.value is not None for t in done) else None
            rows.append((label, 3600 * len(done) / seconds, best))
            first = min((t.datetime_complete for t in done if t.datetime_complete), default=None)
            start = f", first trial done after {(first - t_start).total_seconds():.0f} s" if first else ""
            print(f"  {label}: {len(done)} trials in {seconds:.0f} s{start}, best "
                  f"{'-' if best is None else f'{best:.4f}'}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every code path")
    ap.add_argument("--skip-study", action="store_true", help="the bare model only")
    ap.add_argument("--skip-bare", action="store_true", help="the seed study only")
    ap.add_argument("--settings", nargs="+", choices=["workers", "pack", "both", "graphs"],
                    default=["workers", "pack", "both", "graphs"],
                    help="seed-study settings besides one plain worker (default: all; run in that order)")
    ap.add_argument("--rounds", type=int, default=None, help="timed calls per bare-model variant (default 3, quick 1)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per bare-model call (default 2, quick 1)")
    ap.add_argument("--trials", type=int, default=None, help="seed-study trials per setting (default 40, quick 3)")
    ap.add_argument("--packs", type=int, nargs="+", default=None, help="pack sizes (default 8 32, quick 3)")
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="workers per GPU to try (default 8 16)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads per worker (default: the workers' own default; quick 1)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a "new study created" line per setting
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.epochs = args.epochs or (1 if q else 2)
    args.trials = args.trials or (3 if q else 40)
    args.packs = args.packs or ([3] if q else [8, 32])
    args.threads = args.threads if args.threads is not None else (1 if q else 0)
    args.workers = args.workers or ([2] if q else [8, 16])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    else:
        print(f"torch {torch.__version__}: no CUDA device; running the same code paths on the CPU. "
              "These are not GPU figures: they check the plumbing and show the CPU's own numbers.")
    if not args.skip_bare:
        rows = bare_model(args, device)
        base = rows[0][1]
        print(f"\n| {device} | bare seed model | samples/s | vs one eager trial | note |\n|---|---|---:|---:|---|")
        for label, rate, note in rows:
            shown = ("-", "-") if rate != rate else (f"{rate:.0f}", f"{rate / base:.2f}")  # nan: not measurable here
            print(f"| {device} | {label} | {shown[0]} | {shown[1]} | {note} |")
    if not args.skip_study:
        print(f"\nseed study, {args.trials} trials per setting:", flush=True)
        study_rows = seed_study(args, device)
        plain = study_rows[0][1]
        print(f"\n| {device} | seed study setting | trials/hour | vs one plain worker | best value |\n|---|---|---:|---:|---:|")
        for label, rate, best in study_rows:
            print(f"| {device} | {label} | {rate:.0f} | {rate / plain:.2f} | {'-' if best is None else f'{best:.4f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
