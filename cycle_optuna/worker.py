"""Create or load a study, check it matches the study file, and run one worker on it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import optuna
import sqlalchemy
import torch
from optuna.trial import FrozenTrial, TrialState

from cycle_optuna import config as config_mod
from cycle_optuna import storage as storage_mod
from cycle_optuna.config import StudyConfig
from cycle_optuna.data import TaskData, load_task
from cycle_optuna.errors import StorageError
from cycle_optuna.objective import Objective, make_pruner
from cycle_optuna.sampler import make_sampler
from cycle_optuna.train import EpochMetrics

try:
    from optuna.study._tell import _tell_with_warning
except ImportError:  # pragma: no cover - a future Optuna; the public tell works, reading the trial back
    _tell_with_warning = None

CONFIG_ATTR = "cycle_optuna_config"
STATS_ATTR = "data_stats"
_FINAL = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
POLL_SECONDS = 0.25  # how often an idle worker looks for retries while other workers finish
RECONNECT_SECONDS = 300  # a worker gives up after this long without its database

THREADS_ENV_VAR = "CYCLE_OPTUNA_THREADS"  # set by `run --workers K` for its children

_log = logging.getLogger(__name__)


def build_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    """The study file's sampler, seeded by the study seed."""
    baseline = {p.name: getattr(cfg.baseline, p.name) for p in cfg.space}
    return make_sampler(cfg.sampler, baseline=baseline, seed=cfg.study.seed)


def open_study(
    cfg: StudyConfig, url: str, *, data: TaskData | None = None, create: bool = True
) -> optuna.Study:
    """Create or load the study; refuse one whose stored trial definition differs from `cfg`."""
    cfg = _with_env_artifacts(cfg)
    storage = storage_mod.open_storage(url)
    name = cfg.study.name
    exists = name in {s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    if not exists and not create:
        raise StorageError(f"no study named {name!r} in {storage_mod.mask(url)}")
    if exists:
        stored = optuna.load_study(study_name=name, storage=storage).user_attrs.get(CONFIG_ATTR)
        if stored is not None:
            _check_same_definition(cfg, stored)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=build_sampler(cfg),
        pruner=make_pruner(cfg.pruner, cfg.train.epochs),
        direction=cfg.study.direction,
        load_if_exists=True,
    )
    if CONFIG_ATTR not in study.user_attrs:
        study.set_user_attr(CONFIG_ATTR, cfg.to_dict())
    if data is not None and STATS_ATTR not in study.user_attrs:
        study.set_user_attr(STATS_ATTR, data.stats())
    if cfg.sampler.type not in ("cycle", "reference"):
        # cycle 1 is the baseline for every sampler; the cycle samplers propose it themselves.
        # Under the cap lock, so workers starting together enqueue it once.
        with storage_mod.cap_lock(storage, url, name):
            if not study.get_trials(deepcopy=False):
                study.enqueue_trial({p.name: getattr(cfg.baseline, p.name) for p in cfg.space})
    return study


def _check_same_definition(cfg: StudyConfig, stored: dict) -> None:
    mine = json.loads(json.dumps(cfg.trial_definition()))
    theirs = {k: stored.get(k) for k in mine}
    if mine == theirs:
        return
    diffs = [
        f"{section}.{key}: study has {theirs[section].get(key)!r}, file has {value!r}"
        for section, fields in mine.items()
        for key, value in (fields.items() if isinstance(fields, dict) else [])
        if not isinstance(theirs.get(section), dict) or theirs[section].get(key) != value
    ] + [
        f"space.{key}: only in the study"
        for key in (theirs.get("space") or {})
        if key not in mine["space"]
    ]
    raise StorageError(
        f"study {cfg.study.name!r} was created with a different trial definition "
        f"({'; '.join(diffs[:3])}{' ...' if len(diffs) > 3 else ''}); "
        "use a new study name, or restore the original data/train/baseline/space"
    )


def default_threads(workers: int) -> int:
    """Intra-op threads per worker so that workers x threads <= cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


@dataclass
class Hooks:
    """Progress callbacks for a worker; all optional."""

    on_trial_start: Callable[[int], None] | None = None
    on_epoch: Callable[[optuna.Trial, EpochMetrics], None] | None = None
    on_trial_end: Callable[[optuna.Study, FrozenTrial], None] | None = None


@dataclass
class WorkerStats:
    """What one worker did; filled as it runs, so it is complete even after an interrupt."""

    worker: str = field(default_factory=storage_mod.worker_id)
    states: Counter = field(default_factory=Counter)  # state name -> trials this worker ended
    requeued: list[int] = field(default_factory=list)  # trials it handed back (interrupt, lost database)
    reconnects: int = 0
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        done = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self.states.items())) or "no trials"
        extra = f"; handed back trial {', '.join(map(str, self.requeued))} for retry" if self.requeued else ""
        again = f"; reconnected {self.reconnects}x" if self.reconnects else ""
        return f"worker {self.worker}: {done} in {time.monotonic() - self.started:.0f}s{extra}{again}"


_SIGNALLED: list[int] = []


def install_signal_handlers() -> None:
    """SIGTERM (docker stop, kill) ends the running trial the way Ctrl-C does."""

    def handler(signum: int, frame: object) -> None:
        first = not _SIGNALLED
        _SIGNALLED.append(signum)
        if first:  # later signals must not cut short the hand-back of the running trial
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def interrupt_exit_code() -> int:
    """128 + the signal that stopped the worker (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (_SIGNALLED[-1] if _SIGNALLED else signal.SIGINT)


def _with_env_artifacts(cfg: StudyConfig) -> StudyConfig:
    path = os.environ.get(storage_mod.ARTIFACTS_ENV_VAR)
    return config_mod.override(cfg, artifact_dir=path) if path else cfg


def run_worker(
    cfg: StudyConfig,
    url: str,
    *,
    workers: int = 1,
    hooks: Hooks | None = None,
    stats: WorkerStats | None = None,
) -> optuna.Study:
    """Run trials until the study holds cfg.study.n_trials of them (shared cap across workers).

    The cap is exact: workers count and create trials under a storage lock. Retries of trials whose
    worker died are run first. Once the cap is reached the worker stays while other workers' trials
    run (one of them may die and need a retry), then returns. A trial interrupted by Ctrl-C/SIGTERM
    or cut off by a lost database is failed and re-queued; its retry resumes from its checkpoint.
    """
    hooks = hooks or Hooks()
    stats = stats if stats is not None else WorkerStats()
    cfg = _with_env_artifacts(cfg)
    torch.set_num_threads(cfg.train.threads or int(os.environ.get(THREADS_ENV_VAR, 0)) or default_threads(workers))
    data = load_task(cfg.data, cfg.study.seed, data_path=config_mod.resolve_data_path(cfg))
    study = open_study(cfg, url, data=data)
    objective = Objective(cfg, data, artifact_store=storage_mod.artifact_store(cfg), on_epoch=hooks.on_epoch)
    run_trials(study, url, cfg.study.n_trials, objective, hooks=hooks, stats=stats)
    return study


def run_trials(
    study: optuna.Study,
    url: str,
    n_trials: int,
    objective: Callable[[optuna.Trial], float],
    *,
    hooks: Hooks | None = None,
    stats: WorkerStats | None = None,
) -> None:
    """The worker loop of :func:`run_worker` for any objective (benchmarks, custom studies)."""
    _Loop(study, url, n_trials, objective, hooks or Hooks(), stats if stats is not None else WorkerStats()).run()


class _Loop:
    """One worker's trial loop; see :func:`run_worker`.

    Trials are taken with ask/tell rather than one `study.optimize` call per trial, which would
    re-check stale trials, start a heartbeat thread and re-read the trial for every trial: here the
    stale check runs once per heartbeat interval, one thread beats for the worker's whole life, and
    the worker attr and first beat go in one write (:func:`storage_mod.register_trial`).
    """

    def __init__(self, study: optuna.Study, url: str, n_trials: int, objective: Callable,
                 hooks: Hooks, stats: WorkerStats) -> None:
        self.study, self.url, self.n_trials = study, url, n_trials
        self.objective, self.hooks, self.stats = objective, hooks, stats
        self.current: int | None = None  # number of the trial this worker runs
        self.lost = False  # the current trial failed because the database went away
        self.heartbeat = storage_mod.Heartbeat(study._storage)
        self.stale_checked = -float("inf")  # monotonic time of the last stale-trial check

    def run(self) -> None:
        with self.heartbeat:
            self._run()

    def _run(self) -> None:
        down_since: float | None = None
        while True:
            try:
                step = self._step()
                down_since = None
            except KeyboardInterrupt:
                self.heartbeat.beat_for(None)
                self._hand_back()
                raise
            except Exception as e:
                self.heartbeat.beat_for(None)
                if not storage_mod.is_connection_error(e):
                    raise
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > RECONNECT_SECONDS:
                    raise StorageError(f"lost the storage {storage_mod.mask(self.url)} for "
                                       f"{RECONNECT_SECONDS}s: {storage_mod.mask(str(e).splitlines()[0])}") from None
                self.stats.reconnects += 1
                _log.warning("storage unreachable, retrying: %s", storage_mod.mask(str(e).splitlines()[0]))
                time.sleep(min(10.0, 2.0 ** min(self.stats.reconnects, 4) / 4))
                self.lost = self.current is not None  # a trial cut off mid-way is handed back next step
                continue
            if step == "done":
                return
            if step == "wait":
                time.sleep(POLL_SECONDS)

    def _fail_stale(self, *, always: bool) -> None:
        # A dead worker's trial is failed (and its retry queued) GRACE_SECONDS after its last beat;
        # checking more often than once per beat interval finds nothing sooner.
        interval = self.heartbeat.interval
        if interval is None or (not always and time.monotonic() - self.stale_checked < interval):
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        self.stale_checked = time.monotonic()

    def _step(self) -> str:
        self._hand_back_if_lost()
        study = self.study
        with storage_mod.cap_lock(study._storage, self.url, study.study_name) as conn:
            self._fail_stale(always=False)
            counted, waiting = _count_and_waiting(study, conn)
            if counted >= self.n_trials and not waiting:
                # the cap is met unless a running trial's worker died: fail those, run their retries
                self._fail_stale(always=True)
                counted, waiting = _count_and_waiting(study, conn)
                if not waiting:
                    alive = storage_mod.last_heartbeats(study._storage, study)
                    return "wait" if alive else "done"
            if self.hooks.on_trial_start is not None:
                self.hooks.on_trial_start(min(counted, self.n_trials))
            with warnings.catch_warnings():  # Optuna warns that heartbeats expect optimize: this loop beats
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
                trial = study.ask()  # a retry (WAITING) first, else a new trial; exact under the lock
            self.current = trial.number
            storage_mod.register_trial(study, trial, self.stats.worker, conn)
        self.heartbeat.beat_for(trial._trial_id)
        try:
            told = self._run_trial(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            told = None  # another worker failed our trial as stale (we lost the database too long); it is retried
        finally:
            self.heartbeat.beat_for(None)
        if told is not None:
            self.stats.states[told.name] += 1
            if self.hooks.on_trial_end is not None:
                self.hooks.on_trial_end(study, study._storage.get_trial(trial._trial_id))
        self.current = None
        return "run"

    def _run_trial(self, trial: optuna.Trial) -> TrialState:
        """Run the objective and tell its outcome, as study.optimize(catch=(Exception,)) would.

        A bad trial is recorded as FAIL with its reason and the worker carries on.
        """
        value, state = None, None
        try:
            value = self.objective(trial)
        except optuna.TrialPruned as e:
            state = TrialState.PRUNED
            _log.info("trial %d pruned. %s", trial.number, e)
        except Exception as e:
            if storage_mod.is_connection_error(e):
                raise  # not counted: the loop hands the trial back for retry once the database answers
            state = TrialState.FAIL
            _log.warning("trial %d failed with parameters %s: %r", trial.number, trial.params, e, exc_info=True)
        told, problem = _tell(self.study, trial, value, state)
        if problem:  # e.g. the objective returned NaN: Optuna fails the trial
            _log.warning("trial %d failed: %s", trial.number, problem)
        return told

    def _hand_back_if_lost(self) -> None:
        if self.lost:
            self._hand_back()

    def _hand_back(self) -> None:
        """Fail this worker's unfinished trial and queue its retry (which resumes from its checkpoint)."""
        number, self.current, self.lost = self.current, None, False
        if number is None:
            return
        trials = self.study.get_trials(deepcopy=False)
        trial = next((t for t in trials if t.number == number), None)
        if trial is None or any(number in t.system_attrs.get("retry_history", ()) for t in trials):
            return
        if trial.state == TrialState.RUNNING:
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
        if trial.state == TrialState.FAIL:
            storage_mod.retry_callback()(self.study, trial)
            self.stats.requeued.append(number)


def _tell(study: optuna.Study, trial: optuna.Trial, value: object, state: TrialState | None) -> tuple[TrialState, str | None]:
    """Tell a trial's outcome; (its final state, why a returned value was refused, if it was).

    Optuna's own trial runner tells through `_tell_with_warning`, which does not read the whole
    trial back afterwards as the public `Study.tell` does; use it while it exists.
    """
    if _tell_with_warning is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            frozen = study.tell(trial, value, state=state)
        return frozen.state, (str(caught[0].message) if caught and frozen.state == TrialState.FAIL else None)
    # positional: the value argument's name differs between Optuna releases
    out = _tell_with_warning(study, trial, value, state, suppress_warning=True)
    if isinstance(out, tuple):  # Optuna 5: (state, values, refusal)
        return out[0], out[2]
    return out.state, None  # Optuna 4: the finished trial


def _count(trials: list[FrozenTrial]) -> int:
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


def _count_and_waiting(study: optuna.Study, conn: sqlalchemy.Connection | None = None) -> tuple[int, bool]:
    # one lean query on a database (on the cap lock's connection when it has one); the full trial
    # list elsewhere (journal files)
    lean = storage_mod.count_trials(study._storage, study, conn)
    if lean is not None:
        return lean
    trials = study.get_trials(deepcopy=False)
    return _count(trials), any(t.state == TrialState.WAITING for t in trials)


def trials_counted(study: optuna.Study) -> int:
    """Trials toward the study's n_trials cap: all, except failures that were retried."""
    return _count_and_waiting(study)[0]


def start_local_workers(
    study_file: str, url: str, workers: int, *, n_trials: int | None, log_prefix: str
) -> list[tuple[subprocess.Popen, str]]:
    """Start `workers` `cycle-optuna worker` processes on one study; (process, log file) pairs.

    The URL travels in the environment, so its password never shows in `ps`.
    """
    env = {**os.environ, storage_mod.ENV_VAR: url, THREADS_ENV_VAR: str(default_threads(workers))}
    args = [sys.executable, "-m", "cycle_optuna.cli", "worker", str(study_file)]
    if n_trials is not None:
        args += ["--n-trials", str(n_trials)]
    os.makedirs(os.path.dirname(log_prefix) or ".", exist_ok=True)
    procs = []
    for i in range(workers):
        log = f"{log_prefix}-worker-{i + 1}.log"
        with open(log, "w") as f:
            procs.append((subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT), log))
    return procs
