"""`cycle-optuna` command line: parse, call the package, print with rich."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cycle_optuna.durations import seconds_text
from cycle_optuna.errors import CycleOptunaError, StorageError
from cycle_optuna.redact import mask


class _Console(Console):
    """rich's Console, whose closed pipe (`best | head -2`) ends the command as `export | head` does:
    exit 141, like a shell tool killed by SIGPIPE (rich's own handler exits 1, a failure)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError  # main() turns it into 141, its stdout pointed at /dev/null


# emoji off: ":100:" in a study file's value, a data path or a worker's log line is text, not 💯
out = _Console(emoji=False)
err = _Console(stderr=True, emoji=False)

EXAMPLES = {
    "run": """examples:
  cycle-optuna run studies/quick.toml
  cycle-optuna run studies/seed.toml --n-trials 30
  cycle-optuna run studies/seed.toml --timeout 1h30m      # start no cycle after 90 minutes
  cycle-optuna run studies/seed.toml --workers 4
  cycle-optuna run studies/seed.toml --workers-per-gpu 4        # 4 workers on each visible GPU
  cycle-optuna run studies/seed.toml --workers 2 --gpus 0,2
  cycle-optuna run studies/seed.toml --storage postgresql+psycopg://user@db/optuna   # password: ~/.pgpass or $PGPASSWORD
  CYCLE_OPTUNA_STORAGE=postgresql+psycopg://user:pass@db/optuna cycle-optuna run studies/seed.toml   # not in argv, which other users can read""",
    "worker": """examples:
  cycle-optuna worker studies/seed.toml
  cycle-optuna worker studies/seed.toml --gpus 1
  cycle-optuna worker studies/seed.toml --timeout 8h      # start no cycle after 8 hours
  CYCLE_OPTUNA_STORAGE=postgresql+psycopg://user:pass@db/optuna cycle-optuna worker studies/seed.toml
  cycle-optuna worker studies/seed.toml --storage postgresql+psycopg://db/optuna --wait-for-storage 120""",
    "status": """examples:
  cycle-optuna status studies/seed.toml
  cycle-optuna status studies/seed.toml --storage postgresql+psycopg://user@db/optuna   # password: ~/.pgpass or $PGPASSWORD""",
    "best": """examples:
  cycle-optuna best studies/seed.toml
  cycle-optuna best studies/seed.toml --json""",
    "refit": """examples:
  cycle-optuna refit my-data.toml
  cycle-optuna refit my-data.toml --ensemble 1   # the best cycle alone
  (my-data.toml: a study file of your own data, docs/data.md)

Trains the configurations of the cycles the best model averages again on the training and
validation series together (the study's seed, epochs and schedule; each keeps its last epoch).
best, predict, report and load_best_model() then use these models while the best cycles stay
the same; the test split is used by neither. Nothing is recorded until every model is stored: an
interrupted refit (Ctrl-C: exit 130, SIGTERM: 143) leaves the study as it was, and a cycle that diverges
on all the series stops it with exit 1.""",
    "report": """examples:
  cycle-optuna report studies/seed.toml
  cycle-optuna report studies/seed.toml -o reports/seed""",
    "predict": """examples:
  cycle-optuna predict my-data.toml new_series.csv -o predictions.csv
  cycle-optuna predict my-data.toml GunPoint_TEST.ts > predictions.csv   # labels in the file: accuracy too
  (my-data.toml: a study file of your own data, docs/data.md)

Columns: series (position in the file), id (a .csv file's sample id), predicted, label (when the
file has labels), then p_<class> for every class of the study.""",
    "export": """examples:
  cycle-optuna export studies/seed.toml --csv seed-cycles.csv
  cycle-optuna export studies/seed.toml --parquet seed-cycles.parquet   # needs cycle-optuna[parquet]
  cycle-optuna export studies/seed.toml > seed-cycles.csv              # CSV on stdout""",
    "dashboard": """examples:
  cycle-optuna dashboard studies/seed.toml
  cycle-optuna dashboard studies/seed.toml --port 8081
  cycle-optuna dashboard studies/seed.toml --host 0.0.0.0   # no authentication: trusted networks only""",
}


def _load(args: argparse.Namespace, *, trains: bool = False):
    """The study file with command-line overrides, and its storage URL. Only commands that train
    (`trains`) need the data files where the study file says; the others read the stored study."""
    from cycle_optuna import config, storage

    cfg = config.override(config.load(args.study, check_files=trains), n_trials=getattr(args, "n_trials", None))
    url = storage.resolve_url(cfg, args.storage)
    if storage.in_memory(url):
        raise config.ConfigError(f"storage {storage.mask(url)} is an in-memory database: the study would end with "
                                 "this process and leave its models behind; give a file, e.g. sqlite:///study.db")
    return cfg, url


def _with_total(args: argparse.Namespace, cfg, url: str):
    """The config with the total to run to (--n-trials, else the larger of file and study), the
    line to print when the study already holds more trials than that, and the study (None when
    it does not exist yet)."""
    from cycle_optuna import config, status, totals

    study = status.find(cfg, url)
    total = totals.resolve(study, flag=args.n_trials, file=cfg.study.n_trials)
    note = totals.too_small(study, total) if study is not None else None
    return config.override(cfg, n_trials=total), note, study


def _trial_log(args: argparse.Namespace, echo: Callable[[str], None]):
    from cycle_optuna.trial_log import TrialLog

    return TrialLog(json_lines=args.log_json, echo=echo)


def _noted(on_end: Callable | None = None) -> Callable:
    """An on_trial_end hook that writes the trial's dashboard note, then calls `on_end`."""
    from cycle_optuna import dashboard

    def hook(study, t) -> None:
        try:
            dashboard.write_trial_note(study, t)
        except Exception as e:  # noqa: BLE001 - a note is a convenience: it must never stop a worker
            logging.getLogger(__name__).warning("dashboard note of trial %d not written: %s", t.number, mask(str(e)))
        if on_end is not None:
            on_end(study, t)

    return hook


def _placement(args: argparse.Namespace) -> list[str | None]:
    """Each worker's GPU (None: the CPU), from --workers, --gpus and --workers-per-gpu."""
    from cycle_optuna import placement

    gpus = getattr(args, "gpus", None)
    if gpus is None and args.workers_per_gpu is None and (args.workers or 1) == 1:
        return [None]  # one worker in this process, on the device [train] device picks, as before
    return placement.plan(args.workers, available=placement.visible_gpus(), gpus=gpus, per_gpu=args.workers_per_gpu)


def _say_err(line: str) -> None:
    err.print(line, highlight=False, soft_wrap=True, markup=False)


def small_validation_note(cfg, data) -> str | None:
    """How cycles are scored, when it is not the plain validation split: cross-validation (what it
    costs), or a validation split of a handful of series (what steadies it)."""
    from cycle_optuna.config import AUTO_FOLDS_MAX_VAL, AUTO_FOLDS_MIN_VAL_PER_CLASS, FOLDS_AUTO, SMALL_VAL

    n = int(data.y_val.shape[0])
    k = data.n_folds

    def named(classes: list[int]) -> str:  # a data file's names, its escape sequences made visible
        return one_line(", ".join(data.class_names[c] if c < len(data.class_names) else str(c) for c in classes))

    if k > 1:
        few = (f", under {AUTO_FOLDS_MIN_VAL_PER_CLASS} per class of its {data.n_classes}"
               if n > AUTO_FOLDS_MAX_VAL else "")
        why = f' ([data] folds = "auto": the validation split alone would hold {n}{few})' if cfg.data.folds == FOLDS_AUTO else ""
        note = (f"note: cycles are scored by {k}-fold cross-validation over the {n + int(data.y_train.shape[0])} "
                f"training and validation series{why}; each cycle trains {k} models, and its model averages them")
        pool = Counter(data.y_train.tolist() + data.y_val.tolist())
        lone = sorted(c for c, count in pool.items() if count == 1)
        if lone:  # its one series is validated by the fold model that never saw the class
            note += (f"; class(es) {named(lone)} have a single series, validated by the one fold model that never "
                     "saw the class: it counts as a likely miss in every cycle's score alike")
        return note
    unscored = sorted(set(range(data.n_classes)) - set(data.y_val.tolist()))
    if unscored:
        total = n + int(data.y_train.shape[0])
        cure = ("[data] folds = 5 cross-validates every series" if total >= 10 else
                f"with {total} training and validation series there are too few to cross-validate (5 folds take 10)")
        return (f"note: class(es) {named(unscored)} have too few series to spare one for the validation split (all "
                f"of them train), so cycles are never scored on them; {cure}")
    if n >= SMALL_VAL:
        return None
    return (f"note: the validation split holds {n} series (val_fraction={cfg.data.val_fraction}): one series is "
            f"{100 / n:.0f} points of val accuracy, so cycles are ranked on little evidence and the best cycle "
            'is partly luck; [data] folds = 5 cross-validates instead, and more data or more cycles steady the '
            "choice")


def length_note(cfg, data, stored: dict | None = None) -> str | None:
    """When series lengths differ widely and patch_len is automatic: the patch follows the padded
    length (the longest series, a longer test file's included), which leaves a typical series a token
    or two (a 16-step series in a set with one 20,000-step series was one patch of 1024 steps, and
    the study stayed at chance)."""
    import math

    import torch

    from cycle_optuna.config import auto_patch_len, with_data_defaults

    if cfg.baseline.patch_len != 0:
        return None  # chosen: cycle 1 runs it (a search moves from it)
    lengths = []
    for part in _series_chunks(data):
        observed = ~torch.isnan(part).all(dim=-1)
        lengths.append((observed * torch.arange(1, part.shape[1] + 1)).amax(dim=1))  # last observed step + 1
    if not lengths:
        return None
    typical, padded = int(torch.cat(lengths).median()), int(data.seq_len)
    auto, fits = auto_patch_len(padded), auto_patch_len(typical)
    if padded <= 8 * typical or auto <= fits:
        return None
    return (f"note: the series are padded to {padded} steps, the median training series has {typical}: the automatic "
            f"patch_len ({auto}) follows the padded length, which makes a series of the median length "
            f"{math.ceil(typical / auto)} token(s); set [baseline] patch_len (a patch of {fits} suits the median series "
            f"and makes the padded length {math.ceil(padded / fits)} tokens), or trim or drop the longest series"
            + ("; patch_len is searched, but cycle 1 runs the automatic one" if any(  # as the study will run
                p.name == "patch_len" for p in with_data_defaults(cfg, padded, stored).space) else ""))


def _series_chunks(data, tensors=None):
    """The training and validation series (or `tensors`), a few million values at a time (views, no
    copy of a large set)."""
    for x in tensors if tensors is not None else (data.x_train, data.x_val):
        rows = max(1, 2**22 // max(x[0].numel() if x.shape[0] else 1, 1))
        for i in range(0, x.shape[0], rows):
            yield x[i:i + rows]


def constant_note(data) -> str | None:
    """Every training value the same: only the series' lengths (their padding) can tell the classes."""
    import torch

    parts = list(_series_chunks(data))  # views, not copies
    if not parts or any(bool((torch.nan_to_num(part) != 0).any()) for part in parts):  # normalised: constant is 0
        return None
    return ("note: every value of the training and validation series is the same, so nothing but the series' "
            "lengths can tell the classes apart; expect chance accuracy unless the lengths differ by class")


OUTLIER_SPREADS = 100  # a value this many interquartile ranges of its feature from the median is named
_SAMPLE_VALUES = 2**22  # values (all features) the medians and the quartiles are estimated from, at most


def outlier_note(data) -> str | None:
    """A training value far outside the rest of its feature: most often a code for a missing value
    (999999, -9999) that the file holds as a number. It sets the scale every series is normalised
    by, so the model sees the other values as nearly constant (ItalyPowerDemand with one 999999 in
    its training file: a small one-cycle study at chance, 0.535 on test against 0.970 without it;
    with one 1e37, 20 default cycles and every reference baseline near 0.49) and nothing said why.

    Measured on the series that set the scale (the training split; under cross-validation the
    validation series too), in the normalised values (the file's, scaled), against each feature's
    median and interquartile range: a code that is a few percent of the values still stands out."""
    import math
    import warnings

    import numpy as np
    import torch

    parts = [data.x_train] + ([data.x_val] if data.fold_ids is not None else [])
    total = sum(p.numel() for p in parts)
    if not total:
        return None
    n_feat = parts[0].shape[2]
    step = max(1, total // _SAMPLE_VALUES)
    flat = torch.cat([p[::step].reshape(-1, n_feat) for p in parts]).numpy()  # every series' values, or a spread of series
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN feature: no quantile
        low, mid, high = np.nanquantile(flat, [0.25, 0.5, 0.75], axis=0)
    spread = torch.from_numpy(np.nan_to_num(high - low)).float()
    usable = spread > 0  # a feature most of whose values are one value (events, flags) has no spread to compare with
    mid = torch.from_numpy(np.nan_to_num(mid)).float()
    worst, count = torch.zeros(n_feat), torch.zeros(n_feat, dtype=torch.int64)
    far = torch.zeros(n_feat)
    for chunk in _series_chunks(data, parts):
        part = chunk.reshape(-1, n_feat)
        dev = torch.where(usable, ((part - mid) / spread.clamp(min=1e-30)).abs(), 0.0).nan_to_num(0.0)
        count += (dev > OUTLIER_SPREADS).sum(dim=0)
        top, at = dev.max(dim=0)
        better = top > worst
        worst, far = torch.where(better, top, worst), torch.where(better, part.gather(0, at[None])[0], far)
    j = int(worst.argmax())
    if float(worst[j]) <= OUTLIER_SPREADS:
        return None
    std, mean = float(data.std[j]), float(data.mean[j])
    digits = max(0, 3 - math.floor(math.log10(float(spread[j]) * std)))  # the float32 round trip's noise, rounded off
    raw = lambda v: f"{round(float(v) * std + mean, digits):.6g}"  # noqa: E731 (the file's own units)
    of = (f" of feature {data.feature_names[j]!r}" if data.feature_names else f" of feature {j}") if n_feat > 1 else ""
    n = int(count[j])
    return (f"note: {n} training value{'s' if n > 1 else ''}{of} {'lie' if n > 1 else 'lies'} far outside the rest (the "
            f"farthest about {raw(far[j])}, where half the values lie between {raw(low[j])} and {raw(high[j])}): a "
            "code for a missing value? It sets the scale every series is normalised by, so the model sees the other "
            "values as nearly constant; leave missing values empty (or NaN) in the file")


IMBALANCE_NOTE_RATIO = 4  # largest training class / smallest, from which the note below is said


def imbalance_note(cfg, data) -> str | None:
    """Classes of very different sizes, trained as they come: accuracy, the loss and the cycles'
    ranking favour the large classes, and a small one may be recalled little (generated 80/15/5
    set, 20-cycle studies: 0.36-0.40 of its 5% class on test; with class_weights = "balanced",
    which weighs the training and the validation loss by class, 0.44-0.60, docs/model.md)."""
    import torch

    if cfg.train.class_weights != "none":
        return None
    counts = torch.bincount(torch.cat([data.y_train, data.y_val]), minlength=data.n_classes)
    if int(counts.min()) == 0 or int(counts.max()) < IMBALANCE_NOTE_RATIO * int(counts.min()):
        return None
    names = data.class_names or tuple(str(i) for i in range(data.n_classes))
    big, small = int(counts.argmax()), int(counts.argmin())
    return (f"note: the classes differ in size ({int(counts[big])} training and validation series of {names[big]!r} "
            f"to {int(counts[small])} of {names[small]!r}): training and the cycles' ranking favour the large ones, "
            "and `best` gives the balanced accuracy and the lowest class recall; [train] class_weights = "
            "\"balanced\" weighs every class equally in training and in the ranking")


def data_notes(cfg, data, held=None) -> list[str]:
    """What `run` and `worker` say about the data before the first cycle (`held`: the study, when it exists)."""
    from cycle_optuna.attrs import CONFIG_ATTR

    stored = held.user_attrs.get(CONFIG_ATTR) if held is not None else None
    notes = (small_validation_note(cfg, data), length_note(cfg, data, stored), constant_note(data),
             outlier_note(data), imbalance_note(cfg, data))
    return [n for n in notes if n is not None]


WORKERS_PER_CORE = 16  # `run --workers K` beyond this many a core is refused: each is a process with PyTorch


def cmd_run(args: argparse.Namespace) -> int:
    from cycle_optuna import config, placement, preflight, status, storage, totals, worker

    deadline = _deadline(args)
    cfg, url = _load(args, trains=True)
    gpus = _placement(args)
    if len(gpus) > (most := WORKERS_PER_CORE * worker.available_cores()):
        raise CycleOptunaError(f"--workers {len(gpus)}: more than {WORKERS_PER_CORE} per core on this machine's "
                               f"{worker.available_cores()} cores ({most}); each worker is a process with PyTorch "
                               "loaded: start workers on more machines with `cycle-optuna worker` instead")
    logs = config.study_dir(cfg) if len(gpus) > 1 else None  # where the workers' logs go
    # one allowance for every wait on the database until the study is open (the workers' included)
    wait = storage.StorageWait(url, args.wait_for_storage, _say_err)
    data = preflight.for_run(cfg, url, wait=wait, say=_say_err, logs=logs)  # bad input: one line, first
    cfg, note, held = wait.call(lambda: _with_total(args, cfg, url))
    if note:
        out.print(note, highlight=False, soft_wrap=True)
        _print_cycles(worker.open_study(cfg, url, data=data, create=False))
        return 0
    fewer = None
    if len(gpus) > 1:  # no more workers than trials left to run: the others would start only to stop
        from optuna.trial import TrialState

        live = Counter(t.state for t in held.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
                       ) if held is not None else Counter()
        # a retry waiting to run is counted toward the total already, yet still needs a worker
        left = cfg.study.n_trials - (worker.trials_counted(held) if held is not None else 0) + live[TrialState.WAITING]
        if left <= 0 and not live[TrialState.RUNNING]:
            out.print(f"the study already holds all its {cfg.study.n_trials} trials; pass a larger total with "
                      "--n-trials N to grow it", highlight=False, soft_wrap=True)
            _print_cycles(held)
            return 0
        if 0 < left < len(gpus):
            fewer = f"note: {left} trial(s) left to run: starting {left} worker(s), not {len(gpus)}"
            gpus = gpus[:left]
    out.print(f"study [bold]{cfg.study.name}[/] on {storage.mask(url)}: "
              f"{cfg.study.n_trials} trial{'s' if cfg.study.n_trials != 1 else ''}, sampler {cfg.sampler.type}, "
              f"pruner {cfg.pruner.type}")
    notes = data_notes(cfg, data, held)
    for note in notes:
        out.print(note, highlight=False, soft_wrap=True, markup=False)
    if fewer:
        out.print(fewer, highlight=False, soft_wrap=True)
    if len(gpus) > 1:
        worker.install_signal_handlers(does=f"stopping the {len(gpus)} workers, which hand back their running trials")
        return _run_workers(args, cfg, url, gpus, data, wait, said=set(notes), deadline=deadline)
    worker.install_signal_handlers()
    if gpus[0] is not None:
        os.environ[placement.GPU_ENV_VAR] = gpus[0]  # this process is the one worker; CUDA has not started
    stats = worker.WorkerStats()
    if args.log_json or not out.is_terminal:  # a progress bar in a log file shows only its last frame
        log = _trial_log(args, lambda line: out.print(line, highlight=False, soft_wrap=True, markup=False))
        try:
            hooks = worker.Hooks(on_trial_begin=log.begin, on_epoch=log.epoch, on_trial_end=_noted(log.end))
            study = worker.run_worker(cfg, url, stats=stats, data=data, hooks=hooks, wait=wait, deadline=deadline)
        except KeyboardInterrupt:
            err.print(f"interrupted: {stats.summary()}")
            return worker.interrupt_exit_code()
        return _after_run(study, cfg, stats, args.timeout)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=out, transient=False) as progress:
        trials = progress.add_task("trials", total=cfg.study.n_trials, info="")
        epochs = progress.add_task("epochs", total=cfg.train.epochs, info="")

        def on_trial_start(done: int) -> None:
            progress.update(trials, completed=done)
            progress.reset(epochs, total=cfg.train.epochs)

        def on_epoch(trial, m) -> None:
            progress.update(epochs, completed=m.epoch + 1, description=f"cycle {trial.number + 1}",
                            info=f"val loss {m.val_loss:.4f}  acc {m.val_accuracy:.1%}")

        ended = []  # this worker's own trials: the pace without reading the whole study again each time

        def on_trial_end(study, t) -> None:  # the stored total: another worker may have raised it
            total, done = totals.shown(study, cfg.study.n_trials), worker.trials_counted(study)
            ended.append(t)
            p = status.pace(ended, total - done, workers=1)
            left = f"; about {seconds_text(p.left_s)} left" if p is not None else ""
            progress.update(trials, total=total, completed=done, info=_trial_line(t) + left)

        hooks = worker.Hooks(on_trial_start=on_trial_start, on_epoch=on_epoch, on_trial_end=_noted(on_trial_end))
        try:
            study = worker.run_worker(cfg, url, hooks=hooks, stats=stats, data=data, wait=wait, deadline=deadline)
        except KeyboardInterrupt:
            err.print(f"interrupted: {stats.summary()}")
            return worker.interrupt_exit_code()
        progress.update(trials, completed=worker.trials_counted(study))
    return _after_run(study, cfg, stats, args.timeout)


def _deadline(args: argparse.Namespace) -> float | None:
    """`--timeout`'s moment on the monotonic clock, counted from the command's start; None without it."""
    return time.monotonic() + args.timeout if args.timeout else None


def _timed_out(study, cfg, timeout: float) -> str:
    from cycle_optuna import totals, worker

    said = f"{timeout:g} s" if timeout < 60 else seconds_text(timeout)
    return (f"time limit reached (--timeout {said}): the study holds {worker.trials_counted(study)} "
            f"of {totals.shown(study, cfg.study.n_trials)} trials; the same command goes on from there")


def _print_closing(study, cfg) -> None:
    """The cycle table, then the best-cycle line under it (`run`, one worker or K)."""
    _print_cycles(study)
    closing = _best_line(study, cfg)
    if closing:
        out.print(closing, highlight=False, soft_wrap=True)


def _best_line(study, cfg) -> str | None:
    """One line under the cycle table: the best cycle, whether a reference baseline still beats it on
    validation (a tuned model below 1-NN is not done), and where its test score and model are."""
    from cycle_optuna import api

    try:
        best = api._completed(study)[0]  # the best cycle as `best` ranks it
    except StorageError:  # no cycle completed
        return None
    acc = best.user_attrs.get("val_accuracy")
    line = f"best: cycle {best.number + 1}, val loss {best.value:.4f}"
    if isinstance(acc, (int, float)):
        line += f", accuracy {acc:.2%}"
        above = [(b["val_accuracy"], b.get("label", k)) for k, b in api.baselines(study).items() if b["val_accuracy"] > acc]
        if above:
            top, label = max(above)
            line += (f"; a reference baseline scores higher on validation ({label}: {top:.2%}): more cycles "
                     "(--n-trials) or another search space may close the gap")
    where = f" {cfg.path}" if cfg.path else ""
    return line + f"; 'cycle-optuna best{where}' gives its held-out test accuracy and the model"


def _after_run(study, cfg, stats, timeout: float | None = None) -> int:
    from cycle_optuna import dashboard, totals, worker

    _print_closing(study, cfg)
    if stats.timed_out:
        out.print(_timed_out(study, cfg, timeout or 0), highlight=False, soft_wrap=True)
    elif not stats.states:
        out.print(f"the study already holds {worker.trials_counted(study)} of {totals.shown(study, cfg.study.n_trials)} trials; "
                  "pass a larger total with --n-trials N to grow it")
    dashboard.write_notes(study)
    return 0


def _run_workers(args: argparse.Namespace, cfg, url: str, gpus: list[str | None], data, wait,
                 said: set[str] = frozenset(), deadline: float | None = None) -> int:
    """`run --workers K`: K local worker processes, one combined view polled from the storage.
    `wait`: what is left of --wait-for-storage, for opening the study and then for the workers;
    `said`: the notes printed already, which each worker's log repeats (not echoed again)."""
    from cycle_optuna import config, dashboard, status, storage, worker

    # created once here, with its stats and reference baselines, so the children do not race
    study = wait.call(lambda: worker.open_study(cfg, url, data=data))
    prefix = str(config.study_dir(cfg) / cfg.study.name)
    procs = worker.start_local_workers(cfg.path, url, len(gpus), n_trials=cfg.study.n_trials, log_prefix=prefix,
                                       gpus=gpus, log_json=args.log_json, wait_for_storage=wait.left,
                                       timeout=None if deadline is None else deadline - time.monotonic())
    worker.stop_too([p.pid for p, _ in procs])  # a second signal here stops them at once too
    try:
        if args.log_json or not out.is_terminal:  # a live view in a log file shows only its last frame
            status.follow(procs, lambda line: out.print(line, highlight=False, soft_wrap=True, markup=False),
                          said=said)
        else:
            status.watch(study, cfg.study.n_trials, procs, epochs=cfg.train.epochs, console=out)
    except KeyboardInterrupt:
        # each worker gets the signal this process got (Ctrl-C: SIGINT, `kill`: SIGTERM, a closed
        # terminal: SIGHUP), once: their handed-back trials and exit codes then name what the user did
        sig = _first_signal() or signal.SIGINT
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(sig)
        for p, _ in procs:
            p.wait()
        err.print(f"interrupted: {len(gpus)} workers stopped; their running trials were handed back for retry")
        return 128 + sig
    finally:
        worker.stop_too([])
    failed = [(p.returncode, log) for p, log in procs if p.returncode != 0]
    for code, log in failed:
        lines = [line for line in Path(log).read_text().splitlines() if line.strip()]
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
            else f"exited with code {code}"
        err.print(f"a worker {how}: {lines[-1] if lines else ''} (log: {log})", highlight=False, soft_wrap=True)
    if failed:
        code = failed[0][0] if failed[0][0] > 0 else 0
        try:
            with storage.named_errors(url):
                done = _study_done(study, cfg.study.n_trials)
        except StorageError as e:  # e.g. the database the workers died of is still away
            err.print(f"[bold red]error:[/] could not read the database to tell whether the study finished: "
                      f"{escape(one_line(str(e)))}", highlight=False, soft_wrap=True)
            return code or 2
        if not done:
            return code or 1
        # the other workers retried its trial and finished the study: the job is done
        err.print("the study holds all its trials: the other workers took over", highlight=False)
    _print_closing(study, cfg)
    if deadline is not None and not _study_done(study, cfg.study.n_trials):
        out.print(_timed_out(study, cfg, args.timeout), highlight=False, soft_wrap=True)
    dashboard.write_notes(study)
    return 0


def _study_done(study, n_trials: int) -> bool:
    """Every trial of the total has ended and none is running or waiting for a retry."""
    from optuna.trial import TrialState

    from cycle_optuna import worker

    live = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    return not live and worker.trials_counted(study) >= n_trials


def _trial_line(t) -> str:
    value = "-" if t.value is None else f"{t.value:.4f}"
    return f"last: cycle {t.number + 1} {t.state.name.lower()} {value}"


def _print_cycles(study) -> None:
    from cycle_optuna.api import cycles

    table = Table(title=f"cycles of {study.study_name}")
    # "drop in cycle": its own val loss from its first epoch to its best (improvement_pct), which a
    # cycle far worse than the best one can have too; "improvement" alone read as gain over the best
    for col in ("cycle", "val loss", "accuracy", "drop in cycle", "state", "changes"):
        table.add_column(col, justify="right" if col not in ("state", "changes") else "left")
    for c in cycles(study):
        table.add_row(
            str(c.cycle),
            "-" if c.value is None else f"{c.value:.4f}",
            "-" if c.val_accuracy is None else f"{c.val_accuracy:.2%}",
            "-" if c.improvement_pct is None else f"{c.improvement_pct:.2f}%",
            c.state.lower(),
            c.key_change,
        )
    out.print(table)


def cmd_worker(args: argparse.Namespace) -> int:
    from cycle_optuna import placement, preflight, storage, totals, worker

    deadline = _deadline(args)
    cfg, url = _load(args, trains=True)
    if args.gpus is not None:
        placement.pin(args.gpus)  # before anything starts CUDA
    wait = storage.StorageWait(url, args.wait_for_storage, _say_err)  # one allowance until the study is open
    data = preflight.for_run(cfg, url, wait=wait, say=_say_err)  # a bad input: one line, first
    cfg, note, held = wait.call(lambda: _with_total(args, cfg, url))
    if note:  # a worker can do nothing useful: say so and stop before anything else
        raise CycleOptunaError(note)
    worker.install_signal_handlers()
    err.print(f"worker on study {cfg.study.name} at {storage.mask(url)}")
    for note in data_notes(cfg, data, held):
        err.print(note, highlight=False, soft_wrap=True, markup=False)
    stats = worker.WorkerStats()
    log = _trial_log(args, lambda line: err.print(line, highlight=False, soft_wrap=True, markup=False))
    try:
        study = worker.run_worker(cfg, url, stats=stats, data=data, wait=wait, deadline=deadline,
                                  hooks=worker.Hooks(on_trial_begin=log.begin, on_epoch=log.epoch,
                                                     on_trial_end=_noted(log.end)))
    except KeyboardInterrupt:
        err.print(f"interrupted: {stats.summary()}")
        return worker.interrupt_exit_code()
    err.print(stats.summary())
    err.print(f"study {cfg.study.name}: {worker.trials_counted(study)} of {totals.shown(study, cfg.study.n_trials)} trials")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cycle_optuna import preflight, status, totals

    cfg, url = _load(args)
    preflight.for_read(url)
    study = status.load(cfg, url)
    out.print(status.render(status.collect(study, totals.shown(study, cfg.study.n_trials)), epochs=cfg.train.epochs))
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    import json

    from cycle_optuna import api, preflight, references

    cfg, url = _load(args)
    preflight.for_read(url)
    rec = api.best_record(args.study, storage=url, with_test=not args.no_test)
    if args.json:  # field names of `optuna best-trial -f json`, plus cycle, hyperparams, test metrics
        out.print_json(json.dumps(rec, default=str))
        return 0
    attrs = rec["user_attrs"]
    table = Table(title=f"best of {cfg.study.name}: cycle {rec['cycle']} (trial {rec['number']})")
    table.add_column("name")
    table.add_column("value", justify="right")
    cv = f" ({rec['folds']}-fold cross-validation)" if rec.get("folds", 1) > 1 else ""
    balanced = ", class-balanced" if rec.get("class_weights") == "balanced" else ""  # the test loss is plain
    table.add_row(f"val loss{balanced}{cv}", "-" if rec["value"] is None else f"{rec['value']:.4f}")  # None: inf, added by hand
    if (val_accuracy := api.finite_number(attrs.get("val_accuracy"))) is not None:
        table.add_row(f"val accuracy{cv}", f"{val_accuracy:.2%}")
    if rec.get("test_accuracy") is not None:
        table.add_row("test accuracy (held out)", f"{rec['test_accuracy']:.2%}")
        table.add_row("test loss (held out)", "n/a" if rec["test_loss"] is None else f"{rec['test_loss']:.4f}")
        recall = rec.get("test_class_recall") or {}
        if len(recall) > 1:  # accuracy alone hides a class the model gets wrong (95/5: 95% for "always the first")
            if len({r["n"] for r in recall.values()}) > 1:  # equal classes: the same figure as accuracy
                table.add_row("test balanced accuracy (held out)", f"{rec['test_balanced_accuracy']:.2%}")
            name = min(recall, key=lambda k: recall[k]["recall"])
            table.add_row("lowest class recall (held out)",
                          escape(f"{recall[name]['recall']:.2%} of {recall[name]['n']} {name!r}"))
        if len(rec.get("model_cycles") or ()) > 1 or rec.get("model_refit"):
            table.add_row("best model", references.model_name(rec["model_cycles"], rec.get("model_refit", False)))
    elif not args.no_test:
        table.add_row("test accuracy (held out)", escape(f"unavailable: {rec.get('test_error')}"))  # a path may hold [..]
    table.add_section()
    for k, v in rec["hyperparams"].items():
        table.add_row(k if k in rec["params"] else f"{k} (fixed)", f"{v:.4g}" if isinstance(v, float) else str(v))
    table.add_section()
    shown = {"improvement_pct": lambda v: f"{v:.1f}%", "train_seconds": seconds_text}
    for k in ("diagnosis", "epochs_run", "n_params", "improvement_pct", "train_seconds"):
        if (v := attrs.get(k)) is not None:
            table.add_row(k, shown[k](v) if k in shown and isinstance(v, (int, float)) else str(v))
    if rec.get("duration_s") is not None:
        table.add_row("duration", seconds_text(rec["duration_s"]))
    out.print(table)
    for b in rec["baselines"]:  # one line per reference baseline: does the tuned model beat it?
        out.print(f"vs {b['line']}", highlight=False, soft_wrap=True)
    if rec.get("baselines_note"):
        out.print(rec["baselines_note"], highlight=False, soft_wrap=True)
    if rec.get("refit_note"):
        out.print(escape(rec["refit_note"].replace("STUDY.toml", args.study)), highlight=False, soft_wrap=True)
    return 0


def cmd_refit(args: argparse.Namespace) -> int:
    from cycle_optuna import api, preflight, references
    from cycle_optuna.errors import TrainingError
    from cycle_optuna.refitting import refit

    cfg, url = _load(args)
    preflight.for_read(url)
    say = lambda line: out.print(line, highlight=False, soft_wrap=True, markup=False)  # noqa: E731
    with out.status("loading the study", spinner="line") as status:
        def on_epoch(k: int, m) -> None:
            status.update(f"model {k + 1}: epoch {m.epoch + 1}/{cfg.train.epochs}, training loss {m.val_loss:.4f}")

        try:
            model = refit(args.study, storage=url, ensemble=args.ensemble, say=say, on_epoch=on_epoch)
        except TrainingError as e:
            err.print(f"[bold red]error:[/] {escape(one_line(str(e)))}", highlight=False, soft_wrap=True)
            return 1
    name = references.model_name([n + 1 for n in model.trial_numbers])
    study = api.load_study(args.study, storage=url)
    default = None  # the cycles best and predict average (their models are not loaded: a lost folder is no error here)
    with contextlib.suppress(StorageError):
        default = [t.number for t in api._members(study, api._completed(study), None)]
    used = (f"the refit model ({name}); load_best_model(ensemble={len(model.trial_numbers)}) uses it" if default is None else
            f"best, predict, report and load_best_model() now use the refit model ({name})"
            if default == list(model.trial_numbers) else
            f"load_best_model(ensemble={len(model.trial_numbers)}) uses the refit model ({name}); best, predict and "
            f"report keep the {references.model_name([n + 1 for n in default])} ([study] ensemble = "
            f"{api.study_config(study).study.ensemble}), not refit")
    if args.no_test:
        say(f"stored: {used}")
        return 0
    data = api.study_data(study, api.study_config(study), "its test split cannot be rebuilt")  # one read for both scores
    mine, own = api.held_out_score(study, model=model, data=data), None
    with contextlib.suppress(StorageError):
        own = api.held_out_score(study, model=api.load_best_model(
            study, ensemble=len(model.trial_numbers), refit=False), data=data)
    versus = f" (the cycles' own models: {own.accuracy:.2%})" if own is not None else ""
    say(f"stored: {used}; held-out test accuracy {mine.accuracy:.2%} on {mine.n} series{versus}")
    return 0


_STOPPED_BY: list[int] = []  # the signal _interrupt turned into KeyboardInterrupt


def _interrupt(signum: int, frame: object) -> NoReturn:
    _STOPPED_BY.append(signum)
    raise KeyboardInterrupt


def _first_signal() -> int | None:
    """The signal that stopped this command: _interrupt's, or the worker handlers' where a command
    installed them; None when none came."""
    worker = sys.modules.get("cycle_optuna.worker")
    signals = [*_STOPPED_BY, *(worker._SIGNALLED if worker is not None else ())]
    return signals[0] if signals else None


def cmd_report(args: argparse.Namespace) -> int:
    from cycle_optuna import preflight, report
    from cycle_optuna.plots import FILES as plot_files

    cfg, url = _load(args)
    preflight.for_read(url)
    preflight.for_report(Path(args.output) if args.output is not None else report.default_dir(args.study, cfg.study.name), cfg)
    path = report.write_report(args.study, args.output, storage=url, test=not args.no_test)
    plots = sorted(plot_files.values())  # the plots it wrote, not other PNGs in the folder
    out.print(f"report of study [bold]{cfg.study.name}[/]: {path} with {len(plots)} plots ({', '.join(plots)})",
              highlight=False, soft_wrap=True)
    return 0


NOT_CSV = (".npz", ".npy", ".parquet", ".feather", ".json", ".jsonl", ".ts", ".arff", ".tsv", ".txt", ".xlsx", ".xls",
           ".pkl", ".pickle", ".h5", ".hdf5")  # other formats a table is written as: `predict -o` writes CSV only


def cmd_predict(args: argparse.Namespace) -> int:
    from cycle_optuna import files, preflight, references
    from cycle_optuna.errors import ConfigError, StorageError
    from cycle_optuna.predict import predict_file

    cfg, url = _load(args)
    preflight.for_read(url)
    target = Path(args.output) if args.output not in (None, "-") else None  # '-': stdout, as export's --csv -
    if target is not None:  # before the model is loaded: a path it cannot write is one line, nothing written
        preflight.check_output_file(target, what="predict output directory", example="predictions.csv")
        preflight.not_an_input(target, cfg, url, args.file, flag="-o")
        if target.suffix.lower() in NOT_CSV:  # CSV text under another format's name (`preds.v2` is a name, not a format)
            raise ConfigError(f"-o {target}: predictions are written as CSV; name a .csv file (or - for stdout)")
    pred = predict_file(args.study, args.file, storage=url)
    labelled = (f"accuracy {pred.accuracy:.2%} against the file's labels" if pred.labels is not None
                else f"the file has no labels (no {cfg.data.label_column!r} column or y array)")
    summary = (f"{len(pred.proba)} series of {args.file} predicted by the best model of study {cfg.study.name} "
               f"({references.model_name(list(pred.cycles), pred.refit)}); {labelled}")
    if (pred.labels is not None and Path(args.file).suffix.lower() == ".npz"
            and pred.classes != tuple(str(k) for k in range(len(pred.classes)))):
        # an .npz's y holds class indices; the study's classes have names (its training file's labels)
        shown = ", ".join(f"{k} = {name!r}" for k, name in enumerate(pred.classes[:4]))
        summary += f" (its y read as class indices: {shown}{', ...' if len(pred.classes) > 4 else ''})"
    if target is None:
        sys.stdout.write(pred.to_csv())
        err.print(summary, highlight=False, soft_wrap=True, markup=False)
        return 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with files.replacing(target) as tmp:  # a failed write leaves no truncated file
            tmp.write_text(pred.to_csv())
    except OSError as e:
        raise StorageError(f"cannot write {target}: {e.strerror or e}") from None
    _beside(target).print(f"{summary}; wrote {target}", highlight=False, soft_wrap=True, markup=False)
    return 0


def _beside(target: Path) -> Console:
    """Where to say what a command wrote to ``target``: stderr when ``target`` is this process's
    stdout (``-o /dev/stdout``), so the line does not land inside the data; else stdout."""
    try:
        a, b = os.stat(target), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no such file, or stdout is no real file
        return out
    return err if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) else out


def cmd_export(args: argparse.Namespace) -> int:
    from cycle_optuna import export, preflight

    cfg, url = _load(args)
    target = args.csv if args.csv is not None else args.parquet
    flag = "--csv" if args.csv is not None else "--parquet"
    if target == "-":  # the usual name for stdout
        if args.parquet is not None:
            raise CycleOptunaError("--parquet -: Parquet is written to a file; use --csv - (or no flag) for stdout")
        target = None
    if target is not None and target.endswith(("/", os.sep)):  # Path() drops the slash: a file of that name
        raise CycleOptunaError(f"{flag} {target}: names a folder; give a file in it, e.g. {target}cycles"
                               f"{'.csv' if args.csv is not None else '.parquet'}")
    if target is not None:
        preflight.not_an_input(Path(target), cfg, url, None, flag=flag)
    if target is None:
        export.frame(args.study, url).to_csv(sys.stdout, index=False)
        return 0
    path = export.write(args.study, target, storage=url, fmt="csv" if args.csv else "parquet")
    _beside(Path(path)).print(f"wrote {path}", highlight=False, soft_wrap=True)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from cycle_optuna import dashboard

    _load(args)  # validates the study file first: a bad file is one clear line, not a traceback
    return dashboard.launch(
        args.study, host=args.host, port=args.port, storage=args.storage,
        echo=lambda line: out.print(line, highlight=False, soft_wrap=True),
        warn=lambda line: err.print(f"[bold yellow]{line}[/]", highlight=False, soft_wrap=True),
    )


def _path(text: str) -> str:
    """A file or directory argument: an empty one is a mistake (it would mean the current directory
    or no flag at all), not a request."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a path, got {text!r}")
    return text


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse whose bad input is one line, like every other (no usage block before it), exit 2."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        from cycle_optuna.redact import remember

        # a URL's password is known before any error can quote it (`--storge URL`: "unrecognized arguments")
        for token in sys.argv[1:] if args is None else args:
            if isinstance(token, str) and "://" in token:
                remember(token.split("=", 1)[1] if token.startswith("--") and "=" in token.split("://")[0] else token)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        from cycle_optuna.storage import mask  # a mistyped flag may sit beside a storage URL

        self.exit(2, f"error: {self.prog}: {one_line(mask(message))} (see '{self.prog} --help')\n")


def _versions() -> str:
    """`--version`: read from the installed packages' metadata (importing torch would take seconds)."""
    from importlib import metadata

    def of(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"cycle-optuna {of('cycle-optuna')} (optuna {of('optuna')}, torch {of('torch')}, "
            f"python {sys.version.split()[0]})")


class _Version(argparse.Action):
    """`--version`, its text read only when asked (package metadata costs ~40 ms: every command would pay it)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(_versions())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cycle-optuna",
        description="Tune small transformers in improvement cycles with Optuna.",
        epilog="Run 'cycle-optuna COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    parser.add_argument("--version", action=_Version, help="this package's version and those of Optuna, PyTorch and Python")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("study", metavar="STUDY.toml", type=_path, help="the study file")
        p.add_argument("--storage", metavar="URL", type=_url,
                       help="storage URL (default: $CYCLE_OPTUNA_STORAGE, the study file, or sqlite beside it)")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks of unexpected errors")
        p.set_defaults(func=func)
        return p

    run = command("run", cmd_run, "run the study's trials with progress, then print the cycle table")
    run.add_argument("--n-trials", type=_trials, metavar="N", help="total trials the study should hold")
    run.add_argument("--workers", type=_positive, metavar="K", default=None,
                     help="local worker processes sharing the study (default 1, in this process), "
                          "spread over the visible GPUs when there are any")
    run.add_argument("--gpus", type=_gpus, metavar="0,2", help="the GPUs to place workers on (default: all visible)")
    run.add_argument("--workers-per-gpu", type=_positive, metavar="N",
                     help="workers on each GPU (without --workers: K = N x GPUs)")
    wk = command("worker", cmd_worker, "run one worker on the study (start several, on many machines)")
    wk.add_argument("--n-trials", type=_trials, metavar="N", help="total trials the study should hold")
    wk.add_argument("--gpus", type=_gpus, metavar="N", help="the GPU this worker trains on (default: the first visible)")
    for p in (run, wk):
        p.add_argument("--log-json", action="store_true",
                       help="one JSON line per trial start and end, and per epoch every 30 s of a long trial "
                            "(default: text lines when not on a terminal)")
        p.add_argument("--timeout", type=_duration, metavar="DURATION",
                       help="start no trial after DURATION (90 or 90s, 45m, 2h, 1h30m); the trials running then "
                            "finish, and the study keeps the rest for the next run (default: none)")
        p.add_argument("--wait-for-storage", type=_seconds, metavar="SECONDS", default=0,
                       help="wait up to SECONDS in all for a database server that does not answer yet (restarting, "
                            "starting up) before giving up; run --workers K gives its workers what is left; "
                            "default 0: fail at once")
    command("status", cmd_status, "trials by state, running trials with their workers, best so far")
    best = command("best", cmd_best, "print the best trial's parameters and metrics")
    best.add_argument("--json", action="store_true", help="machine-readable output (optuna best-trial's field names)")
    best.add_argument("--no-test", action="store_true", help="skip the held-out test evaluation of the best model")
    ref = command("refit", cmd_refit, "train the best model's cycles again on all training series (training + validation)")
    ref.add_argument("--ensemble", type=_positive, metavar="N",
                     help="refit the N best cycles (default: the study's [study] ensemble, 3 unless set)")
    ref.add_argument("--no-test", action="store_true", help="skip the held-out test evaluation of the refit model")
    rep = command("report", cmd_report, "write report.md and PNG plots of the study's cycles")
    rep.add_argument("-o", "--output", metavar="DIR", type=_path,
                     help="output directory (default: <study name>-report beside the study file)")
    rep.add_argument("--no-test", action="store_true", help="skip the held-out test evaluation of the best model")
    exp = command("export", cmd_export, "write one row per cycle (params, state, value, user attrs, reason)")
    where = exp.add_mutually_exclusive_group()
    where.add_argument("--csv", metavar="FILE", type=_path, help="write CSV to FILE (default: CSV on stdout)")
    where.add_argument("--parquet", metavar="FILE", type=_path, help="write Parquet to FILE (needs pyarrow)")
    pred = command("predict", cmd_predict, "predict the class of every series of a data file with the best model")
    pred.add_argument("file", metavar="FILE", type=_path, help="a data file in any format the study reads (labels optional "
                      "in .csv and .npz); relative to the current directory")
    pred.add_argument("-o", "--output", metavar="FILE.csv", type=_path,
                      help="write the predictions to FILE.csv (default, or -: CSV on stdout, the summary on stderr)")
    dash = command("dashboard", cmd_dashboard, "serve optuna-dashboard on the study's storage and artifacts")
    dash.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default 127.0.0.1; optuna-dashboard has no authentication)")
    dash.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0 picks a free one)")
    return parser


def _url(text: str) -> str:
    """An argparse type: a storage URL; an empty one (an unset shell variable) is refused, not the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a storage URL, got {text!r} (leave --storage out for the default)")
    return text


def _gpus(text: str) -> list[int]:
    from cycle_optuna.placement import parse_gpus

    try:
        return parse_gpus(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--gpus ").rstrip(".")) from None


def _whole_number(low: int, what: str, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int from `low` (to `high`), else "must be <what>, got ..."."""

    def parse(text: str) -> int:
        try:
            if not text.isascii():  # int() reads other scripts' digits too ('\uff15' is 5)
                raise ValueError(text)
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


_positive = _whole_number(1, "a positive integer")
_trials = _whole_number(1, "a whole number of trials from 1 to 1000000", 1_000_000)  # config.MAX_TRIALS
_seconds = _whole_number(0, "a whole number of seconds from 0 to 604800 (a week)", 7 * 86_400)

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
MAX_TIMEOUT_S = 365 * 86_400


def _duration(text: str) -> float:
    """An argparse type: a duration in seconds from "90", "90s", "45m", "2h", "1.5h" or "1h30m" (ASCII digits)."""
    number, part = r"(\d+(?:\.\d+)?|\.\d+)", r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([smhd])"
    low = text.lower() if text.isascii() else ""
    if re.fullmatch(rf"\s*{number}\s*", low):
        value: float | None = float(low)
    elif re.fullmatch(rf"(?:{part})+\s*", low):
        value = sum(float(n) * _DURATION_UNITS[u] for n, u in re.findall(part, low))
    else:
        value = None
    if value is None or not 0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be a duration such as 90, 90s, 45m or 2h, more than 0 and at most "
                                         f"365 days, got {text!r}")
    return value


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters (a terminal's escape sequences) written
    as escapes: an error stays one line, whatever a file or a value held."""
    return text.translate(_CONTROL)


def _terminal_gone() -> bool:
    """Whether stdout or stderr is a terminal that no longer answers (hung up: writes fail with EIO)."""
    for fd in (1, 2):
        try:
            os.write(fd, b"")  # nothing written anywhere else (a file, a pipe)
        except OSError as e:
            if e.errno == errno.EIO:
                return True
    return False


def _quiet_fallback(record: logging.LogRecord) -> bool:
    """Optuna's "Caught an error from sqlalchemy: ... Falling back to a slower alternative." (its SQL
    and parameters included) when a query fails, mostly because the database went away, which the
    worker says in one line of its own: shown with --debug only."""
    return not record.getMessage().startswith("Caught an error from sqlalchemy")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 ok, 2 bad input, 1 unexpected error, 130 interrupted."""
    args = build_parser().parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not args.debug:
        logging.getLogger("optuna.storages._rdb.storage").addFilter(_quiet_fallback)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.captureWarnings(True)
    from cycle_optuna.storage import check_environment, mask

    _STOPPED_BY.clear()
    if threading.current_thread() is threading.main_thread():  # every command stops on SIGTERM as on Ctrl-C, exit 143
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        check_environment()
        return args.func(args)
    except CycleOptunaError as e:
        err.print(f"[bold red]error:[/] {escape(one_line(mask(str(e))))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 128 + (_first_signal() or signal.SIGINT)
    except BrokenPipeError:  # `export ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush writes nowhere
        return 141  # 128 + SIGPIPE, as a shell tool killed by the closed pipe
    except Exception as e:  # noqa: BLE001 - the boundary that turns surprises into exit code 1
        if isinstance(e, OSError) and e.errno == errno.EIO and _terminal_gone():
            # its terminal closed (SIGHUP: the running trial was handed back): nothing can be said,
            # and the exit code names the signal, not the write that failed after it
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                os.dup2(devnull, fd)
            sig = _first_signal()
            return 128 + sig if sig else 1
        if args.debug:
            raise
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # e.g. a journal's disk, mid-run
            trains = args.command in ("run", "worker")  # a storage's or a checkpoint's disk; else the output's
            where = f"{e.filename}: " if e.filename else "" if trains else "writing the output: "
            err.print(f"[bold red]error:[/] {escape(one_line(mask(f'{where}{e.strerror}')))}; free space and run "
                      f"again{' (a trial cut off is retried)' if trains else ''}", highlight=False, soft_wrap=True)
            return 2
        from cycle_optuna import storage as storage_mod

        if (lost := storage_mod.lost_server(e)) is not None:  # the server went away in the middle of a command
            trains = args.command in ("run", "worker")
            err.print(f"[bold red]error:[/] lost the database: {escape(one_line(storage_mod.describe(lost)))}; run again once "
                      f"it answers{' (a trial cut off is retried)' if trains else ''}", highlight=False, soft_wrap=True)
            return 2
        err.print(f"[bold red]unexpected error:[/] {escape(one_line(mask(f'{type(e).__name__}: {e}')))} (rerun with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
