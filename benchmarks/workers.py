"""Study workers at scale: throughput with 1-8 workers, and the service's per-trial overhead.

    .venv/bin/python benchmarks/workers.py                 # PostgreSQL on 127.0.0.1 and SQLite
    .venv/bin/python benchmarks/workers.py --storages sqlite --workers 1 2

Throughput: K worker processes (cycle_optuna.worker.run_trials: heartbeats, exact global cap,
retries) share one study whose objective sleeps 1 s; trials per minute, and scaling efficiency =
rate(K) / (K x rate(1)). Sleeping uses no CPU, so this measures the storage and the coordination,
not the cores. Overhead: a no-op objective, the same number of trials, one process, the same
database: the service loop against plain `study.optimize` with RandomSampler, on Optuna's default
RDBStorage(url) and on the storage configured as the service opens it (heartbeats off); the ratio
of seconds per trial (target <= 1.2x).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Iterator

import optuna

from cycle_optuna import storage as storage_mod
from cycle_optuna import worker

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def objective_sleep(seconds: float):
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -1.0, 1.0)
        time.sleep(seconds)
        return x * x
    return objective


def _noop(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", -1.0, 1.0) ** 2


def _new_study(url: str, name: str) -> None:
    optuna.create_study(study_name=name, storage=storage_mod.open_storage(url),
                        sampler=optuna.samplers.RandomSampler(seed=0))


def _worker(url: str, name: str, n_trials: int, seconds: float, barrier) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    study = optuna.load_study(study_name=name, storage=storage_mod.open_storage(url),
                              sampler=optuna.samplers.RandomSampler())
    barrier.wait()
    worker.run_trials(study, url, n_trials, objective_sleep(seconds))


def throughput(url: str, workers: int, per_worker: int, seconds: float) -> float:
    """Trials per minute of `workers` processes on a fresh study of per_worker x workers trials."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    _new_study(url, name)
    n = per_worker * workers
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(workers + 1)
    procs = [ctx.Process(target=_worker, args=(url, name, n, seconds, barrier)) for _ in range(workers)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    done = len(optuna.load_study(study_name=name, storage=url).get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    assert done == n, f"{done} trials finished, expected {n}"
    return 60.0 * n / elapsed


def _per_trial(storage, run, n: int) -> float:
    study = optuna.create_study(study_name=f"o-{uuid.uuid4().hex[:8]}", storage=storage,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    t0 = time.perf_counter()
    run(study)
    return (time.perf_counter() - t0) / n


def overhead(url: str, n: int, rounds: int) -> tuple[float, float, float]:
    """Seconds per no-op trial, median over alternating rounds in this run: plain `study.optimize`
    on Optuna's default RDBStorage(url), plain `study.optimize` on the storage as the service
    configures it (pool, pre-ping, SQLite WAL; heartbeats off), and the service's worker loop."""
    def plain(study):
        study.optimize(_noop, n_trials=n)

    def service(study):
        worker.run_trials(study, url, n, _noop)

    times = [[], [], []]
    for _ in range(rounds):
        times[0].append(_per_trial(optuna.storages.RDBStorage(url), plain, n))
        times[1].append(_per_trial(storage_mod.open_storage(url, heartbeat=False), plain, n))
        times[2].append(_per_trial(storage_mod.open_storage(url), service, n))
    return tuple(statistics.median(t) for t in times)


@contextlib.contextmanager
def _postgres_database() -> Iterator[str]:
    """URL of a new database on the local server, dropped afterwards."""
    import sqlalchemy

    name = f"cycle_bench_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storages", nargs="+", default=["postgresql", "sqlite"], choices=["postgresql", "sqlite"])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--per-worker", type=int, default=8, help="trials per worker in each throughput run")
    ap.add_argument("--seconds", type=float, default=1.0, help="the synthetic objective's duration")
    ap.add_argument("--overhead-trials", type=int, default=100)
    ap.add_argument("--overhead-rounds", type=int, default=5)
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    cleanup = contextlib.ExitStack()
    tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="cycle-bench-")))
    urls = {"postgresql": lambda: cleanup.enter_context(_postgres_database()),
            "sqlite": lambda: f"sqlite:///{tmp / 'bench.db'}"}
    print(f"{args.seconds:g}-second objective, {args.per_worker} trials per worker\n")
    print("| storage | workers | trials/min | efficiency vs 1 worker |")
    print("|---|---:|---:|---:|")
    over = []
    with cleanup:
        for kind in args.storages:
            url = urls[kind]()
            base = None
            for k in args.workers:
                rate = throughput(url, k, args.per_worker, args.seconds)
                base = base or rate / k
                print(f"| {kind} | {k} | {rate:.1f} | {100 * rate / (k * base):.0f}% |", flush=True)
            over.append((kind, *overhead(url, args.overhead_trials, args.overhead_rounds)))
    print(f"\nper-trial time, no-op objective, {args.overhead_trials} trials, one process, "
          f"median of {args.overhead_rounds} alternating rounds\n")
    print("| storage | plain Optuna, default RDBStorage | plain Optuna, service's storage settings "
          "| cycle-optuna worker loop | ratio (vs default) | ratio (vs same settings) |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, raw, same, service in over:
        print(f"| {kind} | {1000 * raw:.1f} ms | {1000 * same:.1f} ms | {1000 * service:.1f} ms "
              f"| {service / raw:.2f}x | {service / same:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
