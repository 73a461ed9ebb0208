"""Command start-up: `status`, `best --json`, `--help` against `optuna trials` on the same study.

    .venv/bin/python benchmarks/cli.py                  # 100-trial SQLite study, median of 5 runs
    .venv/bin/python benchmarks/cli.py --trials 30 --rounds 3

Builds a study of N finished trials (stored config, per-epoch values, the objective's user attrs) in
a temporary SQLite file, then times each command as a fresh process, the way a user runs it: wall
seconds, median of R runs. The anchor is `optuna trials` on the same study (Optuna's own CLI: the same
Python, Optuna, SQLAlchemy and storage opening); the closing line is the ratio status/anchor. Each
command's row also says whether the process imported torch (it should not for these commands).
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = """
[study]
name = "bench"
n_trials = {n}

[data]
n_samples = 60
seq_len = 8
n_features = 2
folds = 1  # command latency, not scoring: the validation split alone

[space]
lr = {{ low = 1e-4, high = 1e-2, log = true }}
n_layers = {{ low = 1, high = 3 }}
"""

# Runs the CLI in a fresh process and reports whether torch got imported along the way.
PROBE = ("import sys, contextlib, io\n"
         "from cycle_optuna.cli import main\n"
         "with contextlib.redirect_stdout(io.StringIO()):\n"
         "    try:\n"
         "        code = main(sys.argv[1:])\n"
         "    except SystemExit as e:\n"
         "        code = e.code\n"
         "sys.stderr.write(f'\\ntorch={\"torch\" in sys.modules} code={code}\\n')\n")


def make_study(directory: Path, n: int) -> Path:
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution

    from cycle_optuna import config

    path = directory / "bench.toml"
    path.write_text(STUDY.format(n=n))
    cfg = config.load(path)
    rng = random.Random(0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="bench", storage=f"sqlite:///{directory / 'bench.db'}")
    study.set_user_attr("cycle_optuna_config", cfg.to_dict())
    study.set_user_attr("cycle_optuna_n_trials", n)
    dists = {"lr": FloatDistribution(1e-4, 1e-2, log=True), "n_layers": IntDistribution(1, 3)}
    study.add_trials([
        optuna.trial.create_trial(
            params={"lr": rng.uniform(1e-4, 1e-2), "n_layers": rng.randint(1, 3)}, distributions=dists,
            value=rng.uniform(0.5, 1.0), intermediate_values={e: rng.uniform(0.5, 1.2) for e in range(5)},
            user_attrs={"val_accuracy": rng.random(), "epochs_run": 5, "diagnosis": "converged", "n_params": 1234},
        ) for _ in range(n)
    ])
    return path


def timed(cmd: list[str], rounds: int, cwd: Path) -> tuple[float, str]:
    """Median wall seconds of `cmd` as a fresh process; the stderr of the last run."""
    times, err = [], ""
    for _ in range(rounds):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
        err = proc.stderr
    return statistics.median(times), err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = make_study(tmp, args.trials)
        py = sys.executable
        optuna_cli = str(Path(py).with_name("optuna"))
        rows = []
        anchor, _ = timed([optuna_cli, "trials", "--study-name", "bench", "--storage", f"sqlite:///{tmp / 'bench.db'}",
                           "-f", "json"], args.rounds, tmp)
        rows.append(("optuna trials (anchor)", anchor, "-"))
        for label, argv in (("cycle-optuna status", ["status", str(path)]),
                            ("cycle-optuna best --json --no-test", ["best", str(path), "--json", "--no-test"]),
                            ("cycle-optuna --help", ["--help"])):
            secs, err = timed([py, "-c", PROBE, *argv], args.rounds, tmp)
            rows.append((label, secs, "yes" if "torch=True" in err else "no"))
        print(f"{args.trials}-trial SQLite study, median of {args.rounds} fresh processes")
        print("| command | seconds | imports torch |")
        print("|---|---:|---|")
        for label, secs, torch in rows:
            print(f"| {label} | {secs:.3f} | {torch} |")
        print(f"ratio status/anchor: {rows[1][1] / anchor:.2f}")


if __name__ == "__main__":
    main()
