"""A study beside other jobs: the default threads (cores other processes leave free) against a fixed
thread per core.

    .venv/bin/python benchmarks/busy.py                    # 0 and 'cores' busy processes, 2 rounds
    .venv/bin/python benchmarks/busy.py --busy 1 --rounds 3 --trials 3 --epochs 3

Each run is `cycle-optuna run` on a copy of studies/seed.toml cut to a few trials and epochs, as a
fresh process, the way a user starts it, in its own folder; N processes spinning in `while True`
stand in for the other jobs. Per N and round, the default (`[train] threads = 0`, which measures the
cores others keep busy before each trial) and `threads = cores` (what the default was before it
looked) run one after the other, alternating which goes first. Wall seconds per run; the closing
line is the ratio fixed/default beside the most busy processes (median of the rounds' paired ratios).
On an idle machine both take every core, so that row's ratio is about 1.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _study(folder: Path, *, trials: int, epochs: int, threads: int) -> Path:
    text = (ROOT / "studies" / "seed.toml").read_text()
    text = re.sub(r"(?m)^n_trials = \d+", f"n_trials = {trials}", text)
    text = re.sub(r"(?m)^epochs = \d+", f"epochs = {epochs}", text)
    text = text.replace("[train]\n", f"[train]\nthreads = {threads}\n", 1)
    text = re.sub(r"(?ms)^\[pruner\].*?(?=^\[|\Z)", "[pruner]\ntype = \"none\"\n\n", text)  # every trial whole
    path = folder / "seed.toml"
    path.write_text(text)
    return path


def _run(path: Path, cores: int) -> tuple[float, int]:
    """Wall seconds of `cycle-optuna run`, and the torch threads it said it took (else every core)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cycle_optuna.cli", "run", str(path)],
                          cwd=path.parent, capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    said = re.findall(r"(\d+) torch threads?", proc.stdout + proc.stderr)
    return seconds, int(said[-1]) if said else cores


def main(argv: list[str] | None = None) -> int:
    cores = os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", nargs="+", type=int, default=[0, cores], help="busy-looping processes beside the study")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args(argv)
    print(_machine.describe())
    print(f"seed.toml cut to {args.trials} trials x {args.epochs} epochs, no pruning; {args.rounds} rounds; "
          f"fixed = {cores} threads\n")
    print("| busy processes | round | default: s | default: threads | fixed: s | fixed/default |")
    print("|---:|---:|---:|---|---:|---:|")
    ratios: dict[int, list[float]] = {}
    for n in args.busy:
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
        try:
            time.sleep(1.0 if n else 0.0)  # let them be running before the study looks
            for r in range(args.rounds):
                seconds: dict[str, float] = {}
                threads = cores
                order = ("default", "fixed") if r % 2 == 0 else ("fixed", "default")
                for kind in order:
                    with tempfile.TemporaryDirectory() as tmp:
                        path = _study(Path(tmp), trials=args.trials, epochs=args.epochs,
                                      threads=0 if kind == "default" else cores)
                        seconds[kind], said = _run(path, cores)
                        if kind == "default":
                            threads = said
                ratio = seconds["fixed"] / seconds["default"]
                ratios.setdefault(n, []).append(ratio)
                print(f"| {n} | {r + 1} | {seconds['default']:.1f} | {threads} | {seconds['fixed']:.1f} | {ratio:.2f} |",
                      flush=True)
        finally:
            for p in spinners:
                p.kill()
                p.wait()
    n = max(ratios)
    print(f"\nratio fixed/default wall seconds beside {n} busy process{'es' if n != 1 else ''} "
          f"(median of {len(ratios[n])} rounds): {statistics.median(ratios[n]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
