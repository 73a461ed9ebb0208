"""What a study's workers are doing: trials by state, running trials, best so far (`status`, `run --workers`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Group
from rich.table import Table

from cycle_optuna import optuna_internals as internals
from cycle_optuna import api
from cycle_optuna import storage as storage_mod
from cycle_optuna.durations import seconds_text
from cycle_optuna.totals import count, shown, stood_in_for


FAILURES_SHOWN = 5  # the latest failures `status` lists with their cause


@dataclass(frozen=True)
class RunningTrial:
    number: int
    worker: str  # "host:pid", or "?" before the worker wrote it
    epochs_done: int
    heartbeat_age: float | None  # seconds since the last beat, by the database's clock; None without heartbeats (journal)
    resumed_from: str | None
    device: str = "-"  # "cpu" or "gpu <id>", as the worker wrote it
    alive: bool | None = None  # its worker a live process of this machine; None: another machine's, or unknown


@dataclass(frozen=True)
class StudyStatus:
    name: str
    n_trials: int | None  # the cap; None for a study other code made (the study file's total is not its)
    counted: int  # trials toward the cap (retried failures excluded)
    states: dict[str, int]
    running: list[RunningTrial] = field(default_factory=list)
    best: FrozenTrial | None = None
    failures: list[tuple[int, str]] = field(default_factory=list)  # (cycle, cause) of failed trials
    baselines: dict = field(default_factory=dict)  # the study's reference baselines, when it has them
    finished: int = 0  # trials that ended for good: not running or waiting, and no retry stands in for them
    pace: Pace | None = None  # how long the rest should take, while workers run and a trial has ended


@dataclass(frozen=True)
class Pace:
    """The time left at the pace so far: every trial left takes the mean of the ended ones (pruned,
    failed and complete alike), a running one less what it has run, shared by the running workers."""

    left_s: float
    mean_s: float
    workers: int


def pace(trials: list[FrozenTrial], left: int, *, workers: int | None = None) -> Pace | None:
    """The Pace of `left` trials to finish (running ones included); None while no worker runs a
    trial (nothing moves) or before any trial has ended (nothing to go by). ``workers``: how many
    go on, where the caller knows (`run`'s own worker between two trials); else the running ones'."""
    now = time.time()
    ended = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
             if t.state.is_finished() and t.datetime_start and t.datetime_complete]
    running = [t for t in trials if t.state == TrialState.RUNNING and t.datetime_start]
    if not ended or (workers is None and not running) or left <= 0:
        return None
    mean = sum(ended) / len(ended)
    spent = sum(min(mean, max(0.0, now - t.datetime_start.timestamp())) for t in running)
    workers = workers or len({t.user_attrs.get(storage_mod.WORKER_ATTR, t.number) for t in running})
    return Pace(max(0.0, left * mean - spent) / workers, mean, workers)


def collect(study: optuna.Study, n_trials: int) -> StudyStatus:
    """Read the study's state from its storage. `n_trials` is the study file's total; a study
    that other code made (trials, but no cycle-optuna config on it) gets none."""
    trials = study.get_trials(deepcopy=False)
    total = None if trials and study.user_attrs.get(api.CONFIG_ATTR) is None else n_trials
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    ages = storage_mod.heartbeat_ages(internals.storage_of(study), study)
    # a journal file has no heartbeats: its workers' lock files tell whether one of this machine has
    # ended (what its stale check reads). A database's heartbeats tell: a pid seen from here may be
    # another PID namespace's (containers that share the host's name)
    journal = storage_mod.journal_file(internals.storage_of(study))
    running = [
        RunningTrial(t.number, str(t.user_attrs.get(storage_mod.WORKER_ATTR, "?")), len(t.intermediate_values),
                     ages.get(t.number), t.user_attrs.get("resumed_from"),
                     str(t.user_attrs.get(storage_mod.DEVICE_ATTR, "-")),
                     None if journal is None else storage_mod.local_alive(t, journal, tidy=False))
        for t in trials if t.state == TrialState.RUNNING
    ]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(done, key=lambda t: t.value) if done else None
    failures = [(t.number + 1, api.failure_cause(t)) for t in trials if t.state == TrialState.FAIL]
    # a trial a retry stands in for counts through its retry, whatever its own state: a hand-back cut
    # short leaves it RUNNING beside its queued retry until a stale check fails it
    retried = stood_in_for(trials)
    finished = sum(t.state.is_finished() and t.number not in retried for t in trials)
    left = (total - finished) if total is not None else 0
    # a running trial whose worker is gone (heartbeat past the grace period) is no worker going on
    lost = {t.number for t in trials if t.state == TrialState.RUNNING
            and (ages.get(t.number) or 0) > storage_mod.grace_period()}
    return StudyStatus(study.study_name, total, count(trials), states, running, best, failures,
                       api.baselines(study), finished, pace([t for t in trials if t.number not in lost], left))


def _ago(age: float | None, alive: bool | None = None) -> str:
    if alive is False:  # a process of this machine that has ended (kill -9, a crash): no need to wait out the grace
        gone = "worker's process has ended, retried by the next worker"
        return gone if age is None else f"{age:.0f}s ago: {gone}"
    if age is None:
        return "-"
    if age > storage_mod.grace_period():
        # past the grace period: the worker is gone (the next worker that looks fails the trial and retries it)
        return f"{age:.0f}s ago: worker lost, retried by the next worker"
    return f"{age:.0f}s ago"


def render(s: StudyStatus, *, epochs: int | None = None) -> Group:
    """Rich tables: states, running trials with their workers, best so far (the study file's
    `epochs` only where the study is the file's)."""
    if s.n_trials is not None:
        title = f"study {s.name}: {s.finished} of {s.n_trials} trials finished"
    else:
        epochs = None
        title = f"study {s.name}: {s.finished} trial{'' if s.finished == 1 else 's'} finished (no total: a study other code made)"
    head = Table(title=title, show_header=True)
    for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"):
        head.add_column(state.lower(), justify="right")
    head.add_row(*(str(s.states.get(state, 0)) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")))
    parts: list = [head]
    if s.pace is not None:
        p = s.pace
        parts.append(f"about {seconds_text(p.left_s)} left at the pace so far ({seconds_text(p.mean_s)} a cycle on "
                     f"average, {p.workers} worker{'' if p.workers == 1 else 's'} running)")
    if s.running:
        run = Table(title="running")
        for col in ("cycle", "epochs", "worker", "device", "last heartbeat", "resumed from"):
            run.add_column(col)
        for r in sorted(s.running, key=lambda r: r.number):
            run.add_row(str(r.number + 1), f"{r.epochs_done}" + (f"/{epochs}" if epochs else ""), r.worker,
                        r.device, _ago(r.heartbeat_age, r.alive), r.resumed_from or "")
        parts.append(run)
    if s.best is not None:
        b = s.best
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in b.params.items())
        acc = b.user_attrs.get("val_accuracy")
        parts.append(f"best so far: cycle {b.number + 1}, val loss {b.value:.4f}"
                     + (f", accuracy {acc:.2%}" if isinstance(acc, (int, float)) else "") + f" ({params})")
    if s.baselines:
        parts.append("reference baselines (val accuracy): " + ", ".join(
            f"{b.get('label', k)} {b['val_accuracy']:.2%}" for k, b in s.baselines.items()
            if isinstance(b.get("val_accuracy"), (int, float))))
    if s.failures:
        shown = s.failures[-FAILURES_SHOWN:]
        more = len(s.failures) - len(shown)
        parts.append("failed: " + "; ".join(f"cycle {c}: {cause}" for c, cause in shown)
                     + (f" (and {more} earlier)" if more else ""))
    return Group(*parts)


def watch(study: optuna.Study, n_trials: int, procs: list, *, epochs: int | None, console, interval: float = 1.0) -> StudyStatus:
    """Live combined view of local worker processes until they all exit; the last status."""
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"), console=console)
    task = bar.add_task("trials", total=n_trials, info="")
    last = collect(study, n_trials)
    with Live(Group(bar, render(last, epochs=epochs)), console=console, refresh_per_second=4) as live:
        while True:
            alive = sum(p.poll() is None for p, _ in procs)
            try:  # the stored total: another worker may have raised it with --n-trials
                last = collect(study, shown(study, n_trials))
            except Exception as e:  # noqa: BLE001 - the view must not die while the database restarts
                if not storage_mod.is_connection_error(e):
                    raise
            bar.update(task, total=last.n_trials, completed=min(last.finished, last.n_trials),
                       info=f"{alive} worker(s) running")
            live.update(Group(bar, render(last, epochs=epochs)))
            if not alive:
                return last
            time.sleep(interval)


def follow(procs: list, echo, *, interval: float = 1.0, said: set[str] | frozenset[str] = frozenset()) -> None:
    """Echo the local workers' log lines as they are written, until every worker has exited: what
    `run --workers K` prints instead of a live view when its output is a file (nohup, SLURM, CI).
    Lines in `said` (the notes `run` printed before starting them, which each worker writes again
    into its own log) are not echoed."""
    read = {log: 0 for _, log in procs}  # bytes of each log already echoed
    while True:
        alive = any(p.poll() is None for p, _ in procs)
        for _, log in procs:
            try:
                with open(log, "rb") as f:
                    f.seek(read[log])
                    chunk = f.read()
            except OSError:
                continue
            # whole lines only while the worker writes; its last line too once every worker is gone
            end = chunk.rfind(b"\n") + 1 if alive else len(chunk)
            read[log] += end
            for line in chunk[:end].decode("utf-8", "replace").splitlines():
                if line not in said:
                    echo(line)
        if not alive:
            return
        time.sleep(interval)


def find(cfg, url: str) -> optuna.Study | None:
    """The study of `cfg` at `url` when it exists, else None (creates nothing but an empty SQLite file)."""
    storage = storage_mod.open_storage(url, heartbeat=False)
    with storage_mod.named_errors(url):
        if cfg.study.name not in optuna.get_all_study_names(storage):
            return None
        return optuna.load_study(study_name=cfg.study.name, storage=storage)


def load(cfg, url: str) -> optuna.Study:
    """The existing study of `cfg` at `url`, without creating or changing anything."""
    from cycle_optuna.errors import StorageError

    storage = storage_mod.open_storage(url, create=False)
    if cfg.study.name not in optuna.get_all_study_names(storage):
        raise StorageError(f"no study named {cfg.study.name!r} in {storage_mod.mask(url)}")
    from cycle_optuna.api import check_readable

    study = optuna.load_study(study_name=cfg.study.name, storage=storage)
    check_readable(study, storage_mod.mask(url), from_file=False)  # states of any study; best needs one minimised value
    return study
