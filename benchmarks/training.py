"""Training-loop throughput: the project's loop against a minimal hand-written PyTorch loop.

    .venv/bin/python benchmarks/training.py            # baseline + large config, eager and compiled (~4-6 min, 2 cores)
    .venv/bin/python benchmarks/training.py --quick    # seconds: a smoke run on tiny sizes
    .venv/bin/python benchmarks/training.py --compile none --rounds 9
    .venv/bin/python benchmarks/training.py --compile none --ablate   # what the gap is made of

Both sides build the same TransformerClassifier (same init, seed), train it on the same in-memory
tensors with the same batch size and the same fused AdamW kernel, and validate once per epoch; each
call is timed from model construction to the last validation result on the host, so samples/second
counts everything a trial pays per epoch. The project's side is `train_and_evaluate` with its NaN
guard, gradient clipping, warmup + cosine schedule, metrics and best-weights copy (early stopping
off, so both run the same epochs). The minimal side is the loop from the PyTorch tutorial: slice a
shuffled batch, forward, cross-entropy, backward, step, and a validation pass under no_grad.

The machine is shared, so the variants alternate within each round (the order rotates every round)
and the ratio is the median of per-round paired ratios; the spread (min..max of those ratios) is
the noise. torch.compile runs on the project's side only: its first call (compilation included) is
reported apart, its later calls are timed like the others. With a GPU present every configuration
is measured on it too. The last line is the project/minimal ratio of the baseline configuration
(eager, on the GPU when there is one, else on the CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from cycle_optuna.config import DataConfig, Hyperparams, TrainConfig
from cycle_optuna.data import load_task
from cycle_optuna.train import build_model, train_and_evaluate

# The seed study's best configuration (reference summary) and the top of the seed study's space.
CONFIGS = {
    "baseline": (Hyperparams(), DataConfig()),
    # 686 samples -> 480 training sequences: 4 steps of 128 per epoch keep a call under ~20 s on one core.
    "large": (Hyperparams(hidden_dim=256, n_layers=6, n_heads=8, batch_size=128), DataConfig(n_samples=686)),
}
QUICK = {
    "baseline": (Hyperparams(hidden_dim=32, n_layers=1, batch_size=32), DataConfig(n_samples=300, seq_len=16)),
    "large": (Hyperparams(hidden_dim=64, n_layers=2, n_heads=4, batch_size=64), DataConfig(n_samples=300, seq_len=16)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minimal_loop(data, hp: Hyperparams, cfg: TrainConfig, *, seed: int) -> float:
    """The hand-written baseline; returns the last validation loss."""
    device = torch.device(cfg.device)
    torch.manual_seed(seed)
    model = build_model(data, hp, cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=True)
    x, y = data.x_train.to(device), data.y_train.to(device)
    xv, yv = data.x_val.to(device), data.y_val.to(device)
    gen = torch.Generator().manual_seed(seed)
    val = math.nan
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen).to(device)
        for i in range(0, len(x), hp.batch_size):
            idx = perm[i:i + hp.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            total = sum(F.cross_entropy(model(xv[i:i + cfg.eval_batch_size]), yv[i:i + cfg.eval_batch_size],
                                        reduction="sum") for i in range(0, len(xv), cfg.eval_batch_size))
        val = (total / len(xv)).item()
    return val


def project_loop(data, hp: Hyperparams, cfg: TrainConfig, *, seed: int) -> float:
    return train_and_evaluate(data, hp, cfg, seed=seed).history[-1].val_loss


def timed(fn, data, hp, cfg, device) -> float:
    """Samples per second of one call."""
    _sync(device)
    t0 = time.perf_counter()
    fn(data, hp, cfg, seed=0)
    _sync(device)
    return len(data.x_train) * cfg.epochs / (time.perf_counter() - t0)


def bench(name: str, hp: Hyperparams, dcfg: DataConfig, device: torch.device, args) -> dict:
    data = load_task(dcfg, 0)
    # one pass over the training split per epoch on both sides (min_epoch_samples would repeat a small one)
    base = TrainConfig(epochs=args.epochs, early_stopping_patience=0, device=device.type, threads=args.threads,
                       min_epoch_samples=0)
    variants = {"minimal": (minimal_loop, base), "project": (project_loop, base)}
    compile_s = None
    if args.compile == "all" or (args.compile == "baseline" and name == "baseline"):
        ccfg = dataclasses.replace(base, compile=True)
        _sync(device)
        t0 = time.perf_counter()
        project_loop(data, hp, ccfg, seed=0)  # compiles (or hits the inductor cache)
        _sync(device)
        compile_s = time.perf_counter() - t0
        variants["project+compile"] = (project_loop, ccfg)
    for fn, cfg in variants.values():  # warm-up: allocator, kernels, lazy imports
        fn(data, hp, dataclasses.replace(cfg, epochs=1), seed=0)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for r in range(args.rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            fn, cfg = variants[v]
            rates[v].append(timed(fn, data, hp, cfg, device))
    paired = {v: [p / m for p, m in zip(rates[v], rates["minimal"])] for v in variants if v != "minimal"}
    return {"name": name, "device": device.type, "hp": hp, "n_train": len(data.x_train),
            "steps": math.ceil(len(data.x_train) / hp.batch_size), "seq_len": data.seq_len, "rates": rates, "paired": paired,
            "compile_s": compile_s}


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def ablate(hp: Hyperparams, dcfg: DataConfig, device: torch.device, args) -> list[tuple[str, float, float | None]]:
    """What the project's extras over the minimal loop cost: (variant, samples/s, kernel launches a step).

    Dropout (the project's masks come from torch.rand, see train.RateDropout), gradient clipping and
    label smoothing are switched off one at a time and together, on both loops where they exist;
    the rest of the gap is the guard, the second parameter group and the loop's bookkeeping.
    Launches are counted by torch.profiler on CUDA only.
    """
    data = load_task(dcfg, 0)
    base = TrainConfig(epochs=args.epochs, early_stopping_patience=0, device=device.type, threads=args.threads,
                       min_epoch_samples=0)
    hp0 = dataclasses.replace(hp, dropout=0.0)
    variants = {
        "minimal": (minimal_loop, hp, base),
        "minimal, no dropout": (minimal_loop, hp0, base),
        "project": (project_loop, hp, base),
        "project, no dropout": (project_loop, hp0, base),
        "project, no clipping": (project_loop, hp, dataclasses.replace(base, grad_clip=0.0)),
        "project, no label smoothing": (project_loop, hp, dataclasses.replace(base, label_smoothing=0.0)),
        "project, none of the three": (project_loop, hp0, dataclasses.replace(base, grad_clip=0.0,
                                                                              label_smoothing=0.0)),
    }
    for fn, h, cfg in variants.values():
        fn(data, h, cfg, seed=0)  # warm-up
    rates: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for r in range(args.rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            fn, h, cfg = variants[v]
            rates[v].append(timed(fn, data, h, cfg, device))
    steps = math.ceil(len(data.x_train) / hp.batch_size) * args.epochs
    rows = []
    for v, (fn, h, cfg) in variants.items():
        launches = None
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn(data, h, cfg, seed=0)
                _sync(device)
            launches = sum(e.count for e in prof.key_averages() if e.key in LAUNCHES) / steps
        rows.append((v, statistics.median(rates[v]), launches))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds: a smoke run")
    ap.add_argument("--configs", nargs="+", default=["baseline", "large"], choices=list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds per config (default 7, quick 3)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per timed call")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: steadier on a shared machine)")
    ap.add_argument("--compile", choices=["none", "baseline", "all"], default="baseline",
                    help="which configs also run the project loop with torch.compile (CPU compilation takes minutes)")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    ap.add_argument("--ablate", action="store_true",
                    help="also time the baseline config with dropout, clipping and label smoothing off (and count "
                         "kernel launches a step on CUDA): what the gap to the minimal loop is made of")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    if args.quick and args.compile == "baseline":
        args.compile = "none"
    torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = QUICK if args.quick else CONFIGS
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.epochs} epoch(s) per call, "
          f"{args.rounds} alternating rounds; devices: {', '.join(devices)}"
          + (f" ({torch.cuda.get_device_name()})" if "cuda" in devices else ""))
    results = []
    for dev in devices:
        for name in args.configs:
            hp, dcfg = table[name]
            results.append(bench(name, hp, dcfg, torch.device(dev), args))
    print("\n| device | config | model | train sequences x steps/epoch | variant | samples/s (median) "
          "| vs minimal (median of paired) | spread (min..max) |")
    print("|---|---|---|---|---|---:|---:|---|")
    for res in results:
        hp = res["hp"]
        model = f"h{hp.hidden_dim} L{hp.n_layers} H{hp.n_heads} bs{hp.batch_size} T{res['seq_len']}"
        for v, rates in res["rates"].items():
            ratio = spread = ""
            if v in res["paired"]:
                p = res["paired"][v]
                ratio, spread = f"{statistics.median(p):.3f}", f"{min(p):.3f}..{max(p):.3f}"
            print(f"| {res['device']} | {res['name']} | {model} | {res['n_train']} x {res['steps']} | {v} "
                  f"| {statistics.median(rates):.1f} | {ratio} | {spread} |")
    for res in results:
        if res["compile_s"] is not None:
            print(f"\ntorch.compile first call ({res['device']}, {res['name']}): {res['compile_s']:.1f} s "
                  "(compilation included; later calls hit the in-process cache)")
    if args.ablate:
        for dev in devices:
            hp, dcfg = table["baseline"]
            rows = ablate(hp, dcfg, torch.device(dev), args)
            print(f"\n| {dev} | baseline, ablated | samples/s (median) | vs minimal | kernel launches a step |"
                  "\n|---|---|---:|---:|---:|")
            for v, rate, launches in rows:
                shown = "-" if launches is None else f"{launches:.0f}"
                print(f"| {dev} | {v} | {rate:.1f} | {rate / rows[0][1]:.3f} | {shown} |")
    head = next((r for r in results if r["device"] == "cuda" and r["name"] == "baseline"),
                next((r for r in results if r["name"] == "baseline"), results[0]))
    print(f"\nratio project/minimal samples/s ({head['device']}, {head['name']}, eager): "
          f"{statistics.median(head['paired']['project']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
