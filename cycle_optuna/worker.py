"""Create or load a study, check it matches the study file, and run one worker on it."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
import sqlalchemy
import torch
from optuna.trial import FrozenTrial, TrialState

from cycle_optuna import baselines
from cycle_optuna.attrs import CONFIG_ATTR, STATS_ATTR
from cycle_optuna import config as config_mod
from cycle_optuna import optuna_internals as internals
from cycle_optuna import placement
from cycle_optuna import storage as storage_mod
from cycle_optuna import totals
from cycle_optuna.config import StudyConfig
from cycle_optuna.data import TaskData, load_study_data
from cycle_optuna.digests import DIGESTS_ATTR, data_digests
from cycle_optuna.errors import ConfigError, StorageError
from cycle_optuna.objective import ModelNotSaved, Objective, make_pruner
from cycle_optuna.sampler import PerTrialSeeded, make_sampler
from cycle_optuna.space import InvalidCombination
from cycle_optuna.totals import count_and_waiting as _count_and_waiting, trials_counted  # noqa: F401 - re-exported
from cycle_optuna.train import EpochMetrics

_FINAL = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
POLL_SECONDS = 0.25  # how often an idle worker looks for retries while other workers finish
LOCAL_CHECK_SECONDS = 5.0  # a journal file (no heartbeats): how often a worker looks for trials of dead local workers
RECONNECT_SECONDS = 300  # a worker gives up after this long without its database

THREADS_ENV_VAR = "CYCLE_OPTUNA_THREADS"  # set by `run --workers K` for its children

_log = logging.getLogger(__name__)



def fail_cause(e: BaseException) -> str:
    """'ExcClass: message' (first line, masked) for a trial's failure."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return storage_mod.mask(f"{type(e).__name__}: {text}" if text else type(e).__name__)[:500]


def _root(e: BaseException) -> BaseException:
    """The innermost chained exception that says something: Optuna wraps a dropped connection in a
    generic storage error, and SQLAlchemy's pool adds a bare one (`InvalidatePoolError: ()`) beneath
    the server's own reason."""
    chain = list(storage_mod.error_chain(e))
    return next((x for x in reversed(chain) if str(x).strip("() ")), chain[-1])


def build_sampler(cfg: StudyConfig, data: TaskData | None = None) -> optuna.samplers.BaseSampler:
    """The study file's sampler, seeded by the study seed. With the data: a batch size at or above
    the largest training split trains as the whole split, so the CycleSampler takes every such
    size for one configuration (on ArrowHead's folds of 29 series, batch 32 -> 64 was a cycle that
    trained exactly as its parent)."""
    if not cfg.space:  # nothing to search: no sampler's reasons ("no baseline given") would be true
        return optuna.samplers.RandomSampler(seed=cfg.study.seed)
    baseline = {p.name: getattr(cfg.baseline, p.name) for p in cfg.space}
    if cfg.sampler.type in ("cycle", "reference"):  # their rules are a function of the trials
        ceilings = None
        if data is not None and any(p.name == "batch_size" for p in cfg.space):
            ceilings = {"batch_size": max(1, data.largest_training_split())}
        return make_sampler(cfg.sampler, baseline=baseline, seed=cfg.study.seed, ceilings=ceilings)
    # Optuna's samplers seeded per trial: workers sharing the study, or a resumed one, draw anew
    return PerTrialSeeded(lambda seed: make_sampler(cfg.sampler, baseline=baseline, seed=seed), cfg.study.seed)


def open_study(
    cfg: StudyConfig, url: str, *, data: TaskData | None = None, create: bool = True
) -> optuna.Study:
    """Create or load the study; refuse one whose stored trial definition differs from `cfg`.
    A storage that fails here (a full disk, a lock another process holds) is one StorageError."""
    with storage_mod.named_errors(url):
        return _open_study(cfg, url, data=data, create=create)


def _open_study(cfg: StudyConfig, url: str, *, data: TaskData | None, create: bool) -> optuna.Study:
    cfg = _with_env_artifacts(cfg)
    storage = storage_mod.open_storage(url)
    name = cfg.study.name
    exists, cfg = _joinable(cfg, storage, url, data.seq_len if data is not None else None)
    if not exists and not create:
        raise StorageError(f"no study named {name!r} in {storage_mod.mask(url)}")
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=build_sampler(cfg, data),
        pruner=make_pruner(cfg.pruner, cfg.train.epochs),
        direction=cfg.study.direction,
        load_if_exists=True,
    )
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is None:
        study.set_user_attr(CONFIG_ATTR, cfg.to_dict())  # its storage URL without the password
    elif (scrubbed := _without_secret(stored)) is not None:  # written by an older release: the dashboard serves it
        study.set_user_attr(CONFIG_ATTR, scrubbed)
    if stored is not None and (note := _record_search(study, cfg)) is not None:
        _log.warning(note)
    if DIGESTS_ATTR not in study.user_attrs and (digests := data_digests(cfg)):
        study.set_user_attr(DIGESTS_ATTR, digests)
    if data is not None and STATS_ATTR not in study.user_attrs:
        study.set_user_attr(STATS_ATTR, data.stats())
    if data is not None and baselines.BASELINES_ATTR not in study.user_attrs:
        # once per study, before its first trial (or when a worker next joins a study made before
        # baselines existed); under the cap lock, so workers starting together compute them once
        with storage_mod.cap_lock(storage, url, name):
            if baselines.BASELINES_ATTR not in study.user_attrs:
                queries, refs, values = baselines.nn_work(data)
                slow = 2 * queries * refs * values > SLOW_BASELINES  # multiply-adds of both 1-NNs
                if slow:  # minutes of silence after the banner, on a large data set
                    _log.warning(f"scoring the reference baselines once for the study: each 1-NN compares {queries} "
                                 f"series with {refs} of {values} values; this can take minutes")
                began = time.monotonic()
                study.set_user_attr(baselines.BASELINES_ATTR, baselines.compute(data, seed=cfg.study.seed))
                if slow:
                    _log.warning(f"reference baselines scored in {time.monotonic() - began:.0f} s")
    if cfg.sampler.type not in ("cycle", "reference"):
        # cycle 1 is the baseline for every sampler; the cycle samplers propose it themselves.
        # Under the cap lock, so workers starting together enqueue it once.
        with storage_mod.cap_lock(storage, url, name):
            if not study.get_trials(deepcopy=False):
                study.enqueue_trial({p.name: getattr(cfg.baseline, p.name) for p in cfg.space})
    return study


SLOW_BASELINES = 2e11  # multiply-adds: about 10 s of a core, a minute on a busy one


def _record_search(study: optuna.Study, cfg: StudyConfig) -> str | None:
    """A study file whose sampler or pruner differs from the ones the study last ran with: record
    from which cycle on (the report names each), and the note to print; None when unchanged."""
    from cycle_optuna import api

    history = api.search_settings(study)
    now = {"sampler": cfg.sampler.type, "pruner": cfg.pruner.type}
    last = history[-1] if history else now
    if {k: last.get(k) for k in now} == now:
        return None
    start = len(study.get_trials(deepcopy=False)) + 1
    study.set_user_attr(api.SEARCH_ATTR, [*history, {"from_cycle": start, **now}])
    return (f"note: sampler {now['sampler']} and pruner {now['pruner']} from cycle {start} on (the study ran "
            f"sampler {last.get('sampler')} and pruner {last.get('pruner')} before); the report names both")


def check_joinable(cfg: StudyConfig, storage: optuna.storages.BaseStorage, url: str, *,
                   seq_len: int | None = None) -> bool:
    """Whether the study exists; refuses one whose stored trial definition differs from `cfg` (with
    `seq_len`, the data's length: as the study runs it, config.with_data_defaults)."""
    return _joinable(cfg, storage, url, seq_len)[0]


def _joinable(cfg: StudyConfig, storage: optuna.storages.BaseStorage, url: str,
              seq_len: int | None) -> tuple[bool, StudyConfig]:
    """(whether the study exists, the config to run it with); refuses a study `cfg` cannot join."""
    name = cfg.study.name
    exists = name in {s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    stored = None
    if exists:
        study = optuna.load_study(study_name=name, storage=storage)
        attrs = study.user_attrs
        stored = attrs.get(CONFIG_ATTR)
        if stored is None and (held := len(study.get_trials(deepcopy=False))):
            # made by other code (an empty one may be ours, cut off before its config was stored)
            raise StorageError(f"study {name!r} in {storage_mod.mask(url)} holds {held} trial(s) that cycle-optuna "
                               "did not make (no study config stored on it); give [study] name another name")
    if seq_len is not None:
        cfg = config_mod.with_data_defaults(cfg, seq_len, stored)
    if stored is not None:
        _check_same_definition(cfg, stored, attrs.get(DIGESTS_ATTR) or {})
        _check_same_artifact_dir(cfg, stored)
    return exists, cfg


def _check_same_artifact_dir(cfg: StudyConfig, stored: dict) -> None:
    """A study's models stay where it was created: `best`, `predict` and `report` read them from the
    folder stored on the study, so a worker writing them elsewhere would lose the best model."""
    if os.environ.get(storage_mod.ARTIFACTS_ENV_VAR):  # one folder for every worker and reader, stated outside
        return
    kept = Path(str((stored.get("study") or {}).get("artifact_dir") or ""))
    mine = config_mod.resolve_artifact_dir(cfg).resolve()
    if kept.is_absolute() and kept.is_dir() and kept.resolve() != mine:
        raise ConfigError(f"study.artifact_dir: study {cfg.study.name!r} keeps its models and checkpoints in {kept}, "
                          f"where it was created, but the file now says {mine}; set it back (or start a new study "
                          "under another [study] name)")


def _without_secret(stored: dict) -> dict | None:
    """The stored config with its storage URL's password masked, or None when it holds none. Only
    that value: masking the whole text would also hit a remembered password that is a word of a key
    (a password "test" made data.test_source "data.***_source", and the study unreadable)."""
    url = (stored.get("study") or {}).get("storage") if isinstance(stored.get("study"), dict) else None
    if not isinstance(url, str) or storage_mod.mask(url) == url:
        return None
    return {**stored, "study": {**stored["study"], "storage": storage_mod.mask(url)}}


def _check_same_definition(cfg: StudyConfig, stored: dict, digests: dict[str, str]) -> None:
    mine = json.loads(json.dumps(cfg.trial_definition()))
    theirs = {k: config_mod.without_execution(k, stored.get(k)) for k in mine}
    if digests and isinstance(theirs.get("data"), dict):
        theirs["data"] = dict(theirs["data"])
        for key, digest in data_digests(cfg, tuple(digests)).items():
            if digests[key] == digest:  # the same file, wherever this worker keeps it
                theirs["data"][key] = mine["data"][key]
            else:  # another file, maybe under the same name: say so by its content
                theirs["data"][key] = f"{theirs['data'].get(key)} (sha256 {digests[key][:12]})"
                mine["data"][key] = f"{mine['data'].get(key)} (sha256 {digest[:12]})"
    for section, added in config_mod.DEFINITION_ADDED.items():  # stored by a release before the key existed
        if isinstance(theirs.get(section), dict):
            theirs[section] = {**added, **theirs[section]}
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
        "use a new study name, or restore the original [study] seed and data/train/baseline/space"
    )


def available_cores() -> int:
    """The machine's cores: what default threads divide and what `train.threads` may not exceed."""
    return os.cpu_count() or 1


def given_threads(cfg: StudyConfig) -> int:
    """The thread count chosen for this process: `[train] threads`, else $CYCLE_OPTUNA_THREADS; 0: none."""
    return cfg.train.threads or storage_mod.env_whole_number(THREADS_ENV_VAR)


def default_threads(workers: int) -> int:
    """Intra-op threads per worker so that workers x threads <= cores."""
    return max(1, available_cores() // max(1, workers))


@dataclass
class Hooks:
    """Progress callbacks for a worker; all optional."""

    on_trial_start: Callable[[int], None] | None = None
    on_trial_begin: Callable[[optuna.Trial], None] | None = None  # the trial, just before its objective runs
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
    timed_out: bool = False  # it stopped taking trials at its deadline (--timeout) with trials left

    def summary(self) -> str:
        done = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self.states.items())) or "no trial finished"
        handed = ", ".join(str(n + 1) for n in self.requeued)  # "cycle N" is trial N - 1, as everywhere
        extra = f"; handed back cycle {handed} for retry" if self.requeued else ""
        again = f"; reconnected {self.reconnects}x" if self.reconnects else ""
        limit = "; stopped at its time limit" if self.timed_out else ""
        return f"worker {self.worker}: {done} in {time.monotonic() - self.started:.0f}s{extra}{again}{limit}"


_SIGNALLED: list[int] = []
_ARRIVED: list[int] = []  # every SIGINT/SIGTERM (and a first SIGHUP) since the handlers were installed, as the watcher saw it


_STOP_TOO: list[int] = []  # `run --workers K`: its workers' pids, stopped at once with it


def _stop_now(signum: int) -> None:
    with contextlib.suppress(OSError):  # stderr may be a closed pipe
        os.write(2, f"second {signal.Signals(signum).name}: stopping now\n".encode())
    for pid in _STOP_TOO:  # their second signal (a first one they had from this process)
        with contextlib.suppress(OSError):
            os.kill(pid, signum)
    os._exit(128 + signum)


def stop_too(pids: list[int]) -> None:
    """A second signal to this process (`run --workers K`) stops these processes at once too: once it
    is gone they would hear only the parent-death SIGHUP, which a worker takes once."""
    _STOP_TOO[:] = pids


# Linux sends a child its parent-death signal again each time it is handed on to another of the
# dead parent's threads: a `run` killed with kill -9 can send its workers two or more. Had it
# been SIGTERM, the repeat would count as the user's second signal and cut the hand-back short.
PARENT_DEATH_SIGNAL = signal.SIGHUP


_FIRST_SIGNAL_DOES = ["handing back the running trial(s)"]  # what the watcher says a first signal does


def install_signal_handlers(does: str = "handing back the running trial(s)") -> None:
    """SIGTERM (docker stop, kill) ends the running trial the way Ctrl-C does; a second signal
    ends the process at once (its trial is then retried by the stale check, like a killed one).
    SIGHUP (the `run` that started a local worker died, or the terminal closed) is a first signal
    and is never a second one: Linux may repeat a parent-death signal (see PARENT_DEATH_SIGNAL).
    A SIGHUP ignored when the process started (nohup) stays ignored.
    ``does``: what the first signal does, said at once (`run --workers K` holds no trial: it stops
    its workers).

    Python runs a signal handler only between bytecodes, so while one long PyTorch call runs, the
    handler waits for it. The second signal must not wait: a watcher thread reads each signal from
    Python's wakeup fd, which the C-level handler writes at once, and ends the process itself (it
    runs while the long call has released the GIL, as PyTorch's kernels do). A child forked after
    this would write its signals into the same pipe: nothing here forks."""

    def handler(signum: int, frame: object) -> None:
        if signum == PARENT_DEATH_SIGNAL and _SIGNALLED:
            return  # the parent's death said again, or a hangup after a stop: nothing new to do
        _SIGNALLED.append(signum)
        if len(_SIGNALLED) > 1:
            _stop_now(signum)
        raise KeyboardInterrupt

    _SIGNALLED.clear()
    _ARRIVED.clear()
    _FIRST_SIGNAL_DOES[0] = does
    _watch_signals()  # first: a signal caught by the handler below is then seen by the watcher too
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if signal.getsignal(PARENT_DEATH_SIGNAL) is not signal.SIG_IGN:
        signal.signal(PARENT_DEATH_SIGNAL, handler)


_WATCHER: list[int] = []  # the wakeup pipe's write end, once the watcher runs


def _watch_signals() -> None:
    if _WATCHER:  # again in one process (tests): the same pipe and thread
        signal.set_wakeup_fd(_WATCHER[0], warn_on_full_buffer=False)
        return
    import threading

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    _WATCHER.append(write_end)

    def watch() -> None:
        while True:
            for signum in os.read(read_end, 64):
                if signum == PARENT_DEATH_SIGNAL:
                    if not _ARRIVED:  # a first signal; a repeat, or one after a stop, changes nothing
                        _ARRIVED.append(signum)
                        with contextlib.suppress(OSError):
                            os.write(2, f"SIGHUP (the terminal closed, or the run that started this process ended): "
                                        f"{_FIRST_SIGNAL_DOES[0]}; a SIGINT or SIGTERM stops at once\n".encode())
                elif signum in (signal.SIGINT, signal.SIGTERM):
                    _ARRIVED.append(signum)
                    if len(_ARRIVED) > 1:
                        _stop_now(signum)
                    # said at once, even while a long call keeps the handler waiting
                    with contextlib.suppress(OSError):
                        os.write(2, f"{signal.Signals(signum).name}: {_FIRST_SIGNAL_DOES[0]}; a second "
                                    f"{signal.Signals(signum).name} stops at once\n".encode())

    threading.Thread(target=watch, name="cycle-optuna-signals", daemon=True).start()


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a signal came: its own may have been swallowed (e.g. raised
    inside a cleanup callback that ignores exceptions), so the loop checks at every step."""
    if _SIGNALLED:
        raise KeyboardInterrupt


def interrupt_exit_code() -> int:
    """128 + the signal that stopped the worker (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (_SIGNALLED[0] if _SIGNALLED else signal.SIGINT)


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
    data: TaskData | None = None,
    wait: storage_mod.StorageWait | None = None,
    deadline: float | None = None,
) -> optuna.Study:
    """Run trials until the study holds cfg.study.n_trials of them (shared cap across workers).

    ``data``: the study's task when the caller has read it already (else it is read here).
    ``wait``: what is left of ``--wait-for-storage``; a database server that stops answering
    while the study is opened is waited for within it.
    ``deadline``: a `time.monotonic()` value (``--timeout``) after which no trial is started (nor a
    retry taken up: it waits for the next run); the trials running then finish, and
    ``stats.timed_out`` says whether it stopped so.

    The cap is exact: workers count and create trials under a storage lock. Retries of trials whose
    worker died are run first. Once the cap is reached the worker stays while other workers' trials
    run (one of them may die and need a retry), then returns. A trial interrupted by Ctrl-C/SIGTERM
    or cut off by a lost database is failed and re-queued; its retry resumes from its checkpoint.
    """
    hooks = hooks or Hooks()
    stats = stats if stats is not None else WorkerStats()
    cfg = _with_env_artifacts(cfg)
    threads = given_threads(cfg)
    torch.set_num_threads(threads or default_threads(workers))
    # A worker started on its own, with no thread count given, shares the cores with the other live
    # workers of the study on this machine (started by hand, each would take them all) and leaves
    # those other jobs keep busy; the load is measured from here, over the start-up, for the first trial.
    share_cores = not threads and workers == 1
    load = placement.CoreLoad() if share_cores else None
    if data is None:  # the CLI passes the data it validated before printing anything
        data = load_study_data(cfg)
        config_mod.check_patch_len(cfg, data.seq_len)  # a file's length is known only once it is read
    study = open_study(cfg, url, data=data) if wait is None else wait.call(lambda: open_study(cfg, url, data=data))
    # a file without [space] also searches patch_len, when the study was made so (as open_study stored it)
    cfg = config_mod.with_data_defaults(cfg, data.seq_len, study.user_attrs.get(CONFIG_ATTR))
    with storage_mod.named_errors(url):
        totals.record(study, cfg.study.n_trials)  # status and progress bars read the total from the study

    def on_epoch(trial: optuna.Trial, m: EpochMetrics) -> None:
        check_interrupted()
        if hooks.on_epoch is not None:
            hooks.on_epoch(trial, m)

    objective = Objective(cfg, data, artifact_store=storage_mod.artifact_store(cfg), on_epoch=on_epoch,
                          defer_cleanup=True)
    objective.sweep_checkpoints(study)  # a worker killed after a trial's tell leaves its checkpoint
    run_trials(study, url, cfg.study.n_trials, objective, hooks=hooks, stats=stats, share_cores=share_cores, load=load,
               deadline=deadline)
    return study


def run_trials(
    study: optuna.Study,
    url: str,
    n_trials: int,
    objective: Callable[[optuna.Trial], float],
    *,
    hooks: Hooks | None = None,
    stats: WorkerStats | None = None,
    share_cores: bool = False,
    load: placement.CoreLoad | None = None,
    deadline: float | None = None,
) -> None:
    """The worker loop of :func:`run_worker` for any objective (benchmarks, custom studies).
    ``share_cores``: before each trial, set torch's threads to the cores divided by the study's
    live workers on this machine, less those other processes keep busy (``load``: measuring since
    the caller began; else from here). ``deadline``: as in :func:`run_worker`."""
    _Loop(study, url, n_trials, objective, hooks or Hooks(), stats if stats is not None else WorkerStats(),
          share_cores=share_cores, load=load, deadline=deadline).run()


class _Loop:
    """One worker's trial loop; see :func:`run_worker`.

    Trials are taken with ask/tell rather than one `study.optimize` call per trial, which would
    re-check stale trials, start a heartbeat thread and re-read the trial for every trial: here the
    stale check runs once per heartbeat interval, one thread beats for the worker's whole life, and
    the worker attr and first beat go in one write (:func:`storage_mod.register_trial`).

    An objective may define `trial_ended(trial_number)` (called once the trial's outcome is
    stored: its checkpoints can go) and `trial_abandoned(study, frozen_trial)` (a failed trial that gets
    no retry: its checkpoints can go too).
    """

    def __init__(self, study: optuna.Study, url: str, n_trials: int, objective: Callable,
                 hooks: Hooks, stats: WorkerStats, *, share_cores: bool = False,
                 load: placement.CoreLoad | None = None, deadline: float | None = None) -> None:
        self.study, self.url, self.n_trials = study, url, n_trials
        self.deadline = deadline
        self.objective, self.hooks, self.stats = objective, hooks, stats
        self.storage = internals.storage_of(study)
        self.current: int | None = None  # number of the trial this worker runs
        self.packed: list[int] = []  # the other trials it runs with it ([train] pack)
        self.lost = False  # the current trials were cut off by the database and await hand-back
        self.lost_cause = ""
        self.heartbeat = storage_mod.Heartbeat(self.storage)
        self.stale_checked = -float("inf")  # monotonic time of the last stale-trial check
        self.pack = getattr(objective, "pack", 1)  # trials taken at once (an Objective's run_pack)
        self.device = placement.device_label(_training_device(objective))
        self.share_cores = share_cores
        self.load = (load or placement.CoreLoad()) if share_cores else None

    def run(self) -> None:
        with self.heartbeat:
            self._run()

    def _run(self) -> None:
        down_since: float | None = None
        tries = 0
        while True:
            try:
                check_interrupted()
                step = self._step()
            except KeyboardInterrupt:
                self._interrupted()
                raise
            except Exception as e:
                self.heartbeat.beat_for(None)
                if not storage_mod.is_connection_error(e):
                    raise
                if self.current is not None:
                    self.lost = True  # handed back by the next step, once the database answers
                if down_since is None:
                    down_since = time.monotonic()
                    self.stats.reconnects += 1
                    held = f"; cycle {self.current + 1} (trial {self.current}) is handed back once it answers" if self.lost else ""
                    reason = storage_mod.describe(e)
                    if "disk is full" in reason and (db := storage_mod.sqlite_path(self.url)) is not None:
                        reason += f" (free space on the disk of {db})"
                    _log.warning("lost the database: %s; retrying for up to %ds%s", reason, RECONNECT_SECONDS, held)
                if time.monotonic() - down_since > RECONNECT_SECONDS:
                    raise StorageError(f"lost the storage {storage_mod.mask(self.url)} for "
                                       f"{RECONNECT_SECONDS}s: {storage_mod.describe(e)}") from None
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise StorageError(self._out_of_time_while_down(e)) from None
                if self.lost:
                    self.lost_cause = f"storage lost mid-trial ({fail_cause(_root(e))}); retried"
                tries += 1
                pause = min(5.0, 2.0 ** min(tries, 4) / 8)
                if self.deadline is not None:  # wake at the deadline, not past it
                    pause = max(0.0, min(pause, self.deadline - time.monotonic()))
                try:
                    time.sleep(pause)
                except KeyboardInterrupt:  # a signal while the database is away: its trial is handed back all the same
                    self._interrupted()
                    raise
                continue
            if down_since is not None:
                _log.warning("database back after %.0fs", time.monotonic() - down_since)
                down_since, tries = None, 0
            if step == "done":
                return
            if step == "wait":
                time.sleep(POLL_SECONDS)

    def _out_of_time_while_down(self, e: BaseException) -> str:
        """The time limit came while the database was away: the worker stops waiting for it (a job's
        wall-time does not wait either); a trial it held is retried by a worker once the database answers."""
        after = f"; {self._not_handed_back()}" if self.lost and self.current is not None else ""
        return (f"time limit reached (--timeout) while the storage {storage_mod.mask(self.url)} was away "
                f"({storage_mod.describe(e)}){after}")

    def _not_handed_back(self, cause: str = "") -> str:
        """What becomes of the trials this worker holds when the database is away as it stops: they stay
        running, their heartbeat stopped, and a worker's stale check fails them and queues their retry."""
        held = [self.current, *self.packed]  # a pack's trials wait with it
        named = ", ".join(f"cycle {n + 1} (trial {n})" for n in held)
        return (f"{named} could not be handed back{f' ({cause})' if cause else ''}; a worker retries "
                f"{'it' if len(held) == 1 else 'them'} once the database answers and the last heartbeat is "
                f"{storage_mod.grace_period()}s old")

    def _interrupted(self) -> None:
        """A signal stops the worker: hand its trial back, or say why that cannot be stored."""
        self.heartbeat.beat_for(None)
        name = signal.Signals(_SIGNALLED[0]).name if _SIGNALLED else "SIGINT"
        try:
            self._hand_back(cause=f"worker interrupted ({self.stats.worker}, {name})")
        except Exception as e:
            if not storage_mod.is_connection_error(e) or self.current is None:
                raise
            _log.warning("%s", self._not_handed_back(storage_mod.describe(e)))  # the database is away, or its disk full

    def _fail_stale(self, conn: sqlalchemy.Connection | None, *, always: bool) -> None:
        # A dead worker's trial is failed (and its retry queued) GRACE_SECONDS after its last beat;
        # checking more often than once per beat interval finds nothing sooner.
        interval = self.heartbeat.interval or LOCAL_CHECK_SECONDS  # a journal file: process checks
        if not always and time.monotonic() - self.stale_checked < interval:
            return
        failed = storage_mod.fail_stale(self.study, conn, on_exhausted=getattr(self.objective, "trial_abandoned", None))
        if failed:
            _log.warning("failed %s: its worker was lost (retried up to %d times)",
                         ", ".join(f"cycle {n + 1} (trial {n})" for n in failed), storage_mod.MAX_RETRY)
        self.stale_checked = time.monotonic()

    def _step(self) -> str:
        self._hand_back_if_lost()
        study = self.study
        with storage_mod.cap_lock(self.storage, self.url, study.study_name) as conn:
            self._fail_stale(conn, always=False)
            counted, waiting = _count_and_waiting(study, conn)
            if self.deadline is not None and time.monotonic() >= self.deadline:
                # out of time: no new trial, no retry (it waits for the next run), no waiting on others
                self.stats.timed_out = counted < self.n_trials or bool(waiting)
                return "done"
            if counted >= self.n_trials and not waiting:
                # the cap is met unless a running trial's worker died: fail those, run their retries
                self._fail_stale(conn, always=True)
                counted, waiting = _count_and_waiting(study, conn)
                if not waiting:
                    alive = storage_mod.last_heartbeats(self.storage, study) or storage_mod.running_here(study)
                    return "wait" if alive else "done"
            if self.hooks.on_trial_start is not None:
                self.hooks.on_trial_start(min(counted, self.n_trials))
            trials = []
            # a packing worker takes up to `pack` trials, never more than the cap has left (a waiting
            # trial, taken first, is counted already)
            for _ in range(max(1, min(self.pack, self.n_trials - counted + waiting))):
                with warnings.catch_warnings():  # Optuna warns that heartbeats expect optimize: this loop beats
                    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
                    trial = study.ask()  # a retry (WAITING) first, else a new trial; exact under the lock
                trials.append(trial)
                self.current, self.packed = trials[0].number, [t.number for t in trials[1:]]
                storage_mod.pause_for_tests("after ask")  # a test kills the worker here
                storage_mod.register_trial(study, trial, self.stats.worker, conn, device=self.device)
        ids = [internals.trial_id_of(t) for t in trials]
        self.heartbeat.beat_for(ids[0] if len(ids) == 1 else ids)
        if self.share_cores:
            self._share_cores()
        try:
            packed = len(trials) > 1
            if packed and self.hooks.on_trial_begin is not None:
                for trial in trials:  # a pack trains its trials together: each starts now, not when its outcome is told
                    self.hooks.on_trial_begin(trial)
            for trial, objective in zip(trials, self._objectives(trials)):
                try:
                    told = self._run_trial(trial, objective, begun=packed)
                except optuna.exceptions.UpdateFinishedTrialError:
                    # this worker was silent past the grace period (paused, cut off from the database)
                    _log.warning("cycle %d was taken over: another worker failed it as stale and queued its "
                                 "retry; going on with the next trial", trial.number + 1)
                    told = None
                self._release(trial.number)  # told (or failed by another worker): no longer ours to hand back
                if told is not None:
                    ended = getattr(self.objective, "trial_ended", None)
                    if ended is not None:
                        ended(trial.number)  # its outcome is stored: its checkpoints can go
                    self.stats.states[told.name] += 1
                    if self.hooks.on_trial_end is not None:
                        self.hooks.on_trial_end(study, self.storage.get_trial(internals.trial_id_of(trial)))
        finally:
            self.heartbeat.beat_for(None)
        self.current, self.packed = None, []
        return "run"

    def _share_cores(self) -> None:
        """Threads = cores // the study's live workers on this machine (this one included, its trial
        registered): workers started by hand side by side do not each take every core. Fewer while
        other processes keep cores busy (measured over the last trial; before the first, over the
        worker's start-up, at least a quarter of a second): a spinning thread kept off its core
        stalls every step."""
        local = storage_mod.local_workers(self.study)
        cores = available_cores()
        share = max(1, cores // max(1, local))
        others = self.load.others(wait=self.load.last is None) if self.load is not None else None
        threads = placement.threads_beside(share, cores, others)
        if threads != torch.get_num_threads():
            if threads < share:
                _log.warning("other processes keep %.1f of this machine's %d cores busy: %d torch thread%s for "
                             "this worker until they are free (set [train] threads to choose)", others, cores, threads,
                             "" if threads == 1 else "s")
            elif torch.get_num_threads() < threads and local == 1:
                _log.warning("the cores are free again: %d torch threads", threads)
            else:
                _log.warning("%d worker(s) of this study run on this machine: %d torch thread(s) each "
                             "(set [train] threads to choose)", local, threads)
            torch.set_num_threads(threads)

    def _objectives(self, trials: list[optuna.Trial]) -> list[Callable[[optuna.Trial], float]]:
        """One objective per trial: the objective itself, or for a pack the outcomes of one run_pack."""
        if len(trials) == 1:
            return [self.objective]
        return [lambda trial, outcome=outcome: _replay(outcome) for outcome in self.objective.run_pack(trials)]

    def _run_trial(self, trial: optuna.Trial, objective: Callable[[optuna.Trial], float] | None = None, *,
                   begun: bool = False) -> TrialState:
        """Run the objective and tell its outcome, as study.optimize(catch=(Exception,)) would.

        A bad trial is recorded as FAIL with its reason (`fail_cause`) and the worker carries on.
        """
        value, state, cause = None, None, None
        if self.hooks.on_trial_begin is not None and not begun:
            self.hooks.on_trial_begin(trial)
        try:
            value = (objective or self.objective)(trial)
        except optuna.TrialPruned as e:
            state = TrialState.PRUNED
            _log.info("cycle %d (trial %d) pruned. %s", trial.number + 1, trial.number, e)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise  # another worker failed the trial as stale: not this trial's failure, nothing to tell
        except Exception as e:
            if storage_mod.is_connection_error(e):
                raise  # not counted: the loop hands the trial back for retry once the database answers
            if self.url.startswith("journal:") and isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                # the journal's disk filled: the study's fault, not the trial's. Stop with the trial
                # left running, so it is retried once there is space (a FAIL might just still fit)
                raise
            state = TrialState.FAIL
            cause = fail_cause(e)
            # a fault of the machine (full disk) or parameters the model cannot be built from are one
            # line; a bug in a trial shows its traceback
            _log.warning("cycle %d (trial %d) failed with parameters %s: %r", trial.number + 1, trial.number, trial.params, e,
                         exc_info=not isinstance(e, (ModelNotSaved, InvalidCombination)))
        told, problem = internals.tell(self.study, trial, value, state)
        self._release(trial.number)  # its outcome is stored: nothing left to hand back
        if problem:  # e.g. the objective returned NaN: Optuna fails the trial
            cause = problem
            _log.warning("cycle %d (trial %d) failed: %s", trial.number + 1, trial.number, problem)
        if told == TrialState.FAIL and cause:
            storage_mod.write_fail_cause(self.study, internals.trial_id_of(trial), cause)
        return told

    def _hand_back_if_lost(self) -> None:
        if self.lost:
            self._hand_back(cause=self.lost_cause or f"worker lost its database ({self.stats.worker})")

    def _hand_back(self, *, cause: str) -> None:
        """Fail this worker's unfinished trials and queue their retries (which resume from their checkpoints).

        A trial stays this worker's until its hand-back is stored: while the database is still
        away this raises, and the next step tries again.
        """
        while self.current is not None:
            self._hand_back_one(self.current, cause=cause)
            self._release(self.current)
        self.lost = False

    def _release(self, number: int) -> None:
        rest = [n for n in [self.current, *self.packed] if n is not None and n != number]
        self.current, self.packed = (rest[0] if rest else None), rest[1:]

    def _hand_back_one(self, number: int, *, cause: str) -> None:
        # The retry is queued before the trial is failed: a hand-back cut short (a second signal,
        # the database) leaves it running with its retry queued, and whoever fails it next (this
        # loop's next try, another worker's stale check) queues no second one. A failed trial
        # without a retry was failed by a stale check whose worker died before queuing it. "Is a
        # retry queued? Queue one" is done under the cap lock, as every stale check does it, so a
        # stale check failing this trial at the same moment cannot queue a second retry.
        with storage_mod.cap_lock(self.storage, self.url, self.study.study_name):
            trials = self.study.get_trials(deepcopy=False)
            trial = next((t for t in trials if t.number == number), None)
            if trial is None or trial.state not in (TrialState.RUNNING, TrialState.FAIL):
                return
            queued = not storage_mod.retried(trials, number)
            if queued:
                storage_mod.queue_retry(self.study, trial)
                self.stats.requeued.append(number)
        if queued:
            storage_mod.pause_for_tests("handing back")
        trial_id = internals.trial_id_of(trial)
        if trial.state == TrialState.RUNNING:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # failed meanwhile by a stale check
                # the cause first: a journal drops attrs written to a finished trial
                self.storage.set_trial_user_attr(trial_id, storage_mod.FAIL_CAUSE_ATTR, storage_mod.mask(cause))
                self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        elif storage_mod.FAIL_CAUSE_ATTR not in trial.user_attrs:
            storage_mod.write_fail_cause(self.study, trial_id, cause)
        abandoned = getattr(self.objective, "trial_abandoned", None)
        if abandoned is not None and storage_mod.retries_exhausted(trial):
            abandoned(self.study, trial)


def _replay(outcome: float | Exception) -> float:
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _training_device(objective: object) -> str:
    cfg = getattr(objective, "cfg", None)
    if cfg is None:
        return "cpu"
    from cycle_optuna.train import resolve_device

    try:
        return resolve_device(cfg.train.device).type
    except ConfigError:  # cuda asked for but absent: each trial fails with the reason, as before
        return cfg.train.device


def start_local_workers(
    study_file: str, url: str, workers: int, *, n_trials: int | None, log_prefix: str,
    gpus: list[str | None] | None = None, log_json: bool = False, wait_for_storage: float = 0,
    timeout: float | None = None,
) -> list[tuple[subprocess.Popen, str]]:
    """Start `workers` `cycle-optuna worker` processes on one study; (process, log file) pairs.

    The URL travels in the environment, so its password never shows in `ps`. ``gpus[i]`` puts
    worker i on that GPU (its CUDA_VISIBLE_DEVICES; see placement.plan); None leaves it as is.
    ``log_json``: each worker logs JSON lines (``worker --log-json``). ``wait_for_storage``: each
    worker waits up to that many seconds (rounded up) for a database server that does not answer
    as it starts (``worker --wait-for-storage``); 0: none. ``timeout``: seconds after which each
    worker starts no trial (``worker --timeout``; at least a millisecond); None: none.
    """
    # cores / workers each, unless the user fixed the threads for every worker in the environment
    threads = os.environ.get(THREADS_ENV_VAR, "").strip() or str(default_threads(workers))
    env = {**os.environ, storage_mod.ENV_VAR: url, THREADS_ENV_VAR: threads}
    args = [sys.executable, "-m", "cycle_optuna.cli", "worker", str(study_file)]
    if n_trials is not None:
        args += ["--n-trials", str(n_trials)]
    if log_json:
        args.append("--log-json")
    if wait_for_storage > 0:
        args += ["--wait-for-storage", str(math.ceil(wait_for_storage))]
    if timeout is not None:
        args += ["--timeout", f"{max(timeout, 0.001):.3f}"]
    os.makedirs(os.path.dirname(log_prefix) or ".", exist_ok=True)
    procs, stop_with_parent = [], _parent_death_signal()
    for i in range(workers):
        log = f"{log_prefix}-worker-{i + 1}.log"
        with open(log, "w") as f:
            own = {**env, **placement.worker_env(gpus[i] if gpus else None)}
            # own session: a Ctrl-C at the terminal reaches only the parent, which stops each worker
            # with one SIGTERM (a second signal would stop a worker at once, before its hand-back)
            procs.append((subprocess.Popen(args, env=own, stdout=f, stderr=subprocess.STDOUT,
                                           start_new_session=True, preexec_fn=stop_with_parent),
                          log))
    return procs


def _parent_death_signal() -> Callable[[], None] | None:
    """For a local worker, before it starts: SIGHUP when the `run` that started it dies, even by
    kill -9 (Linux's parent-death signal), so it hands its trial back instead of training unseen.
    Resolved here, in the parent: the child, forked beside other threads, only makes the calls.
    A SIGHUP ignored by `run` (nohup) is not inherited: the worker, in a session of its own, has no
    terminal to hang up, and this is the one SIGHUP it can get."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    parent = os.getpid()

    def in_child() -> None:
        signal.signal(PARENT_DEATH_SIGNAL, signal.SIG_DFL)
        prctl(1, PARENT_DEATH_SIGNAL)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:  # it died before the signal was asked for
            os._exit(128 + PARENT_DEATH_SIGNAL)

    return in_child
